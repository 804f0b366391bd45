"""Gemma-Ko style continued pre-training of the official Gemma 2 9B on Korean (+ some English).

  python -m gemma2_jax.train --config=configs/continue_pretrain_ko_9b.py \
      --workdir=gs://BUCKET/runs/gemma2-ko-9b \
      --config.init_from=/ckpt/gemma-2-9b \
      --config.data.tokenizer=/ckpt/gemma-2-9b/tokenizer.model --distributed

`init_from` takes the HF safetensors dir, the Kaggle Flax checkpoint or a native one; the optimizer
starts fresh. Learning rate 5e-5 -> 1e-6 (cosine) after 500 warmup steps, weight decay 0.1, 8k context,
a global batch of 256 x 8192 tokens (2M tokens) built from 8 accumulated micro-batches (sized for
32 chips, e.g. a TPU v5p-64: one sequence per chip per micro-batch, splash attention on TPU;
`python -m gemma2_jax.aot --config=configs/continue_pretrain_ko_9b.py --topology=v5p:4x4x2`: 38.5 GiB
peak per chip of 95, 58.2 with the XLA blockwise attention).
The data mix is 70% Korean web/news/blog text and 30% English (to limit forgetting), by packed
rows. Two eval sets: expect the Korean one's bits per byte (`eval/ko/bits_per_byte`) to drop steadily
in the first few thousand steps while the English loss (`eval/en/loss`, the forgetting watch) stays
within a few hundredths of a nat of its start.
For the full corpora, tokenize each language once into the bucket with N workers (one command per
host, I = 0..N-1; a killed one is re-run and finishes its missing shards; the last to finish writes
meta.json), for ko and likewise for en:
  python -m gemma2_jax.prepare_data tokenize --input 'gs://BUCKET/ko/*.jsonl' --format jsonl \
      --tokenizer /ckpt/gemma-2-9b/tokenizer.model --output_dir gs://BUCKET/ko_tokenized \
      --num_shards 1024 --worker_index $I --worker_count N
then train on the shards, keeping the mix:
  --config.data.train.sources="[{'name': 'ko', 'weight': 0.7, 'format': 'arrayrecord',
      'paths': ['gs://BUCKET/ko_tokenized/*.array_record*']}, {'name': 'en', 'weight': 0.3,
      'format': 'arrayrecord', 'paths': ['gs://BUCKET/en_tokenized/*.array_record*']}]"
The JSONL as configured suits small corpora and quick experiments: it is tokenized on the fly, which
costs host CPU every epoch.
Every 2000 steps the run scores KoBEST, HAE-RAE and English HellaSwag / ARC (200 examples each) with
lm-evaluation-harness on its own params (`bench/<task>/acc`): install with `--extras=tpu,eval`, fill
the hosts' HF datasets cache first (or point the tasks at local YAMLs), or turn it off with
--config.train.benchmarks.every=0.
"""

from gemma2_jax.model.config import gemma2_9b
from gemma2_jax.training.experiment import base_config


def get_config():
  model = gemma2_9b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                    remat="save_dots")
  c = base_config(model, steps=20_000, global_batch=256, seq_len=8192, grad_accum_steps=8,
                  loss_chunk=1024, log_every=20, eval_every=500, eval_batches=32)
  c.init_from = "/ckpt/gemma-2-9b"
  c.optimizer.learning_rate = 5e-5
  c.optimizer.end_learning_rate = 1e-6
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.1
  c.data.tokenizer = "/ckpt/gemma-2-9b/tokenizer.model"
  source = dict(c.data.train.sources[0])
  c.data.train.sources = [
    {**source, "name": "ko", "paths": ["gs://BUCKET/ko/*.jsonl"], "format": "jsonl", "weight": 0.7},
    {**source, "name": "en", "paths": ["gs://BUCKET/en/*.jsonl"], "format": "jsonl", "weight": 0.3},
  ]
  c.data.eval = {  # two eval sets, logged as eval/ko/... and eval/en/...
    name: {**dict(c.data.train), "sources": [
      {**source, "name": f"{name}_eval", "paths": [f"gs://BUCKET/{name}_eval/*.jsonl"], "format": "jsonl"}]}
    for name in ("ko", "en")}
  # lm-eval benchmarks on the training params every 2000 steps (bench/<task>/<metric>): Korean
  # knowledge, grammar and reasoning (KoBEST, HAE-RAE) and English ones to watch forgetting, 200
  # examples each. Needs the `eval` extra and the tasks' data in the hosts' HF datasets cache.
  c.train.benchmarks.update(every=2000, limit=200, batch_size=32, max_length=2048, tasks=(
    "kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic", "haerae",
    "hellaswag", "arc_easy", "arc_challenge"))
  # Checkpoints: every 500 steps or 30 minutes, whichever comes first; the last 3 kept, and a
  # milestone every 5000 steps kept for good.
  c.checkpoint.update(save_every=500, save_every_minutes=30, keep_last=3, keep_every=5000)
  return c

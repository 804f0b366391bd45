"""Requests/s of our lm-eval backend (`gemma2_jax`) vs the harness's own `hf` backend (transformers),
same random Gemma 2 saved as HF, fp32, CPU, the same requests.

  .venv/bin/python scripts/bench_lm_eval.py          # d=512 L=8 V=1024, 96 MC docs x 4, 24 texts
  .venv/bin/python scripts/bench_lm_eval.py --smoke  # tiny sizes: checks that it runs

The requests: `loglikelihood` of a local multiple-choice task (a KoBEST-shaped YAML over JSON data
written here from tests/data/ko, its requests built by lm_eval itself) and `loglikelihood_rolling` of
longer texts from the same corpus (several windows of max_length each). Both backends take the same
batch size and max_length. Each side runs once untimed (ours: compiles one program per length
bucket), then `--runs` timed runs alternate between the two; the scores are checked equal (rel 1e-4).
Prints each side's median requests/s per request type and `ours/hf: N.NNx`, the ratio of the total
times of both request types (medians).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.hf_utils
SP_MODEL = ROOT / "tests" / "data" / "ko_sp1024_chat.model"
CORPUS = ROOT / "tests" / "data" / "ko"


def sentences() -> list[str]:
  out = []
  for path in sorted(CORPUS.glob("*.txt")):
    for line in path.read_text().splitlines():
      out += [s.strip() + "." for s in line.split(".") if len(s.strip()) >= 12]
  return out


def write_task(folder: Path, docs: int, rng) -> str:
  """A KoBEST-shaped multiple-choice task (question, 4 choices, label) over local JSON."""
  pool = sentences()
  rows = []
  for _ in range(docs):
    picks = rng.choice(len(pool), 5, replace=False)
    question, *choices = (pool[i] for i in picks)
    rows.append({"question": question[:80], "choices": [c[:40] for c in choices],
                 "label": int(rng.integers(4))})
  (folder / "mc.json").write_text(json.dumps(rows, ensure_ascii=False))
  (folder / "bench_mc.yaml").write_text(
    "task: bench_ko_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    f"    test: {folder / 'mc.json'}\ntest_split: test\noutput_type: multiple_choice\n"
    'doc_to_text: "질문: {{question}}\\n답:"\ndoc_to_choice: choices\ndoc_to_target: label\n'
    'target_delimiter: " "\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n')
  return str(folder / "bench_mc.yaml")


def mc_requests(task_file: str) -> list:
  from gemma2_jax.benchmarks.evaluate import Tasks

  tasks = Tasks([task_file])
  task = tasks.manager.load(tasks.names)["tasks"][tasks.names[0]]
  task.build_all_requests(rank=0, world_size=1)
  return list(task.instances)


def rolling_requests(n: int, chars: int, rng) -> list:
  from lm_eval.api.instance import Instance

  pool = sentences()
  texts = []
  for _ in range(n):
    text = ""
    while len(text) < chars:
      text += " " + pool[int(rng.integers(len(pool)))]
    texts.append(text.strip()[:chars])
  return [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
          for i, t in enumerate(texts)]


def save_model(path: Path, a):
  from transformers import GemmaTokenizer

  from gemma2_jax.model.config import tiny
  from tests.hf_utils import random_hf_model

  heads = a.d_model // 64
  cfg = tiny(vocab_size=1024, num_layers=a.layers, d_model=a.d_model, num_heads=heads,
             num_kv_heads=max(heads // 2, 1), head_dim=64, ffn_dim=4 * a.d_model,
             query_pre_attn_scalar=64, sliding_window=a.window)
  hf = random_hf_model(cfg, seed=0, scale=0.05)
  hf.save_pretrained(path)
  (path / "sp").mkdir()
  shutil.copy(SP_MODEL, path / "sp" / "tokenizer.model")
  GemmaTokenizer.from_pretrained(path / "sp", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", add_bos_token=True).save_pretrained(path)
  shutil.copy(SP_MODEL, path / "tokenizer.model")  # ours: a checkpoint's default tokenizer


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--window", type=int, default=64, help="sliding window of the local layers")
  p.add_argument("--docs", type=int, default=96, help="multiple-choice docs (4 choices each)")
  p.add_argument("--texts", type=int, default=24, help="loglikelihood_rolling texts")
  p.add_argument("--chars", type=int, default=600, help="characters per rolling text")
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  a = p.parse_args()
  if a.smoke:
    p.set_defaults(d_model=64, layers=2, window=8, docs=4, texts=2, chars=120, max_length=32,
                   batch_size=4, runs=1)
    a = p.parse_args()

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    os.environ["HF_DATASETS_CACHE"] = str(d / "datasets")  # the task's data: no trace left
    from lm_eval.models.huggingface import HFLM

    from gemma2_jax.benchmarks.harness import Gemma2JaxLM

    save_model(d / "model", a)
    mc = mc_requests(write_task(d, a.docs, rng))
    rolling = rolling_requests(a.texts, a.chars, rng)
    kw = dict(batch_size=a.batch_size, max_length=a.max_length)
    backends = {"ours": Gemma2JaxLM(checkpoint=str(d / "model"), dtype="float32", progress=False,
                                    **kw),
                "hf": HFLM(pretrained=str(d / "model"), dtype="float32", device="cpu", **kw)}
    kinds = {"loglikelihood": mc, "loglikelihood_rolling": rolling}
    times = {(b, k): [] for b in backends for k in kinds}
    scores = {}
    for run in range(a.runs + 1):  # run 0: warm-up (compiles), untimed
      for kind, reqs in kinds.items():
        for name, lm in backends.items():
          start = time.perf_counter()
          out = getattr(lm, kind)(reqs, disable_tqdm=True)
          if run:
            times[name, kind].append(time.perf_counter() - start)
          scores[name, kind] = [o[0] if isinstance(o, tuple) else o for o in out]
  for kind in kinds:
    np.testing.assert_allclose(scores["ours", kind], scores["hf", kind], rtol=1e-4)

  print(f"model d={a.d_model} L={a.layers} V=1024 fp32 CPU, batch {a.batch_size}, max_length "
        f"{a.max_length}; {len(mc)} loglikelihood requests ({a.docs} docs), {len(rolling)} rolling "
        f"texts of {a.chars} chars; median of {a.runs} runs")
  print(f"{'request type':<24}{'ours req/s':>12}{'hf req/s':>12}{'ours/hf':>10}")
  total = {"ours": 0.0, "hf": 0.0}
  for kind, reqs in kinds.items():
    med = {b: statistics.median(times[b, kind]) for b in backends}
    for b in backends:
      total[b] += med[b]
    print(f"{kind:<24}{len(reqs) / med['ours']:>12.1f}{len(reqs) / med['hf']:>12.1f}"
          f"{med['hf'] / med['ours']:>9.2f}x")
  print(f"ours/hf: {total['hf'] / total['ours']:.2f}x")


if __name__ == "__main__":
  main()

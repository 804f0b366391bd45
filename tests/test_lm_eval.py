"""The lm-evaluation-harness backend (gemma2_jax/benchmarks/harness.py) against lm_eval's own `hf`
backend (HFLM) on the same random Gemma 2, fp32: loglikelihood, rolling loglikelihood, greedy
generation, and a local multiple-choice task through `lm_eval.simple_evaluate`. No hub: the task YAML
and its data are in tests/data/lm_eval/, the HF tokenizer is built from a shipped SentencePiece model.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra (pip install -e '.[eval]')")
torch = pytest.importorskip("torch")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gemma2_jax.model.config import tiny  # noqa: E402
from tests.hf_utils import random_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SP_MODEL = REPO / "tests" / "data" / "ko_sp1024_chat.model"
TASKS = REPO / "tests" / "data" / "lm_eval"
MAX_LENGTH = 24  # short: texts below span several rolling windows; windows wrap the local layers' 8
RTOL = 1e-5

CONTEXTS = ["대한민국헌법 제1조", "질문: 하늘의 색은\n답:", "", "모든 국민은 ", "<s>헌법"]
CONTINUATIONS = [" 대한민국은 민주공화국이다.", " 파란색", "대한민국", "법 앞에 평등하다", " 전문"]
TEXTS = ["대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
         "짧은 글", "모든 국민은 인간으로서의 존엄과 가치를 가지며, 행복을 추구할 권리를 가진다. 12345"]


def hf_tokenizer(path: Path):
  """Gemma's HF tokenizer over our SentencePiece model: its special pieces named, <bos> added."""
  from transformers import GemmaTokenizer

  src = path / "sp"
  src.mkdir()
  shutil.copy(SP_MODEL, src / "tokenizer.model")
  return GemmaTokenizer.from_pretrained(src, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", add_bos_token=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from gemma2_jax.benchmarks.harness import Gemma2JaxLM

  cfg = tiny(vocab_size=1024, sliding_window=8)
  hf = random_hf_model(cfg, seed=1, scale=0.3)
  with torch.no_grad():  # a smaller embedding: varied greedy continuations
    hf.model.embed_tokens.weight.mul_(0.2)
  path = tmp_path_factory.mktemp("lm_eval_model")
  hf.save_pretrained(path)
  hf_tokenizer(path).save_pretrained(path)
  shutil.copy(SP_MODEL, path / "tokenizer.model")  # ours: the default tokenizer of a checkpoint
  ref = HFLM(pretrained=str(path), dtype="float32", batch_size=3, max_length=MAX_LENGTH,
             device="cpu")
  ours = Gemma2JaxLM(checkpoint=str(path), dtype="float32", batch_size=4, max_length=MAX_LENGTH,
                     max_gen_toks=12)
  return ours, ref


def requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_tokens_match_hf(models):
  ours, ref = models
  for text in [*TEXTS, "<s>헌법", "a</s>b", ""]:
    assert ours.tok_encode(text) == ref.tok_encode(text), text
    assert ours.tok_encode(text, add_special_tokens=False) == ref.tok_encode(
      text, add_special_tokens=False), text
  for ctx, cont in zip(CONTEXTS, CONTINUATIONS, strict=True):
    if ctx:
      assert ours._encode_pair(ctx, cont) == ref._encode_pair(ctx, cont)
  assert (ours.prefix_token_id, ours.eot_token_id) == (ref.prefix_token_id, ref.eot_token_id)


def test_loglikelihood_matches_hf(models):
  ours, ref = models
  # Long contexts too: left-truncated to max_length + 1 tokens, as HFLM does.
  args = list(zip(CONTEXTS + [TEXTS[0]], CONTINUATIONS + [" 끝"], strict=True))
  got = ours.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
  want = ref.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL)
  assert [g[1] for g in got] == [w[1] for w in want]
  # is_greedy at the token level: the model's own greedy continuation is greedy in both, and one
  # token changed is not.
  ids = ours.tok_encode("대한민국")
  greedy = ours.sampler([ids], _greedy(ours, 4))[0].tokens
  changed = greedy[:2] + [(greedy[2] + 1) % 1000 + 6] + greedy[3:]
  rows = [(("x", "y"), ids, greedy), (("x", "z"), ids, changed)]
  got, want = ours._loglikelihood_tokens(rows), ref._loglikelihood_tokens(rows)
  assert [g[1] for g in got] == [w[1] for w in want] == [True, False]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL)


def _greedy(lm, n):
  from gemma2_jax.inference.sampler import SamplingConfig

  return SamplingConfig(max_new_tokens=n, temperature=0.0, stop_tokens=(lm.eot_token_id,),
                        cache_dtype="float32")


def test_loglikelihood_rolling_matches_hf(models):
  ours, ref = models
  assert len(ours.tok_encode(TEXTS[0])) > MAX_LENGTH + 1  # several windows
  args = [(t,) for t in TEXTS]
  got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", args), disable_tqdm=True)
  want = ref.loglikelihood_rolling(requests("loglikelihood_rolling", args), disable_tqdm=True)
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_generate_until_matches_hf(models):
  ours, ref = models
  args = [("대한민국헌법 제1조", {"until": ["다."], "max_gen_toks": 12, "do_sample": False}),
          ("모든 국민은", {"until": ["\n\n"], "max_gen_toks": 12}),
          ("<s>짧은", {"until": ["은"], "max_gen_toks": 12, "temperature": 0.0}),
          ("질문: 하늘의 색은\n답:", {"until": ["\n\n"], "max_gen_toks": 12})]
  got = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
  want = ref.generate_until(requests("generate_until", args), disable_tqdm=True)
  assert got == want
  assert sum(len(t) for t in got) > 10  # real continuations


def test_chat_template(models):
  ours, _ = models
  history = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "안녕"}]
  assert ours.apply_chat_template(history) == (
    "<s><start_of_turn>user\n짧게\n\n안녕<end_of_turn>\n<start_of_turn>model\n")
  cont = ours.apply_chat_template([*history[1:], {"role": "assistant", "content": "네"}],
                                  add_generation_prompt=False)
  assert cont.endswith("<start_of_turn>model\n네")
  assert ours.tok_encode(cont)[:2] == [2, 4]  # one <bos>, then <start_of_turn>


def test_multiple_choice_task_matches_hf(models, monkeypatch, tmp_path):
  ours, ref = models
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.chdir(TASKS)  # the task's data_files are relative to it
  from lm_eval.tasks import TaskManager

  tasks = TaskManager(include_path=str(TASKS), include_defaults=False)  # no indexing of all tasks
  out = {}
  for name, lm in (("ours", ours), ("hf", ref)):
    out[name] = lm_eval.simple_evaluate(model=lm, tasks=["gemma2_jax_ko_mc"], task_manager=tasks,
                                        log_samples=True, bootstrap_iters=0)
  ours_r, hf_r = (out[n]["results"]["gemma2_jax_ko_mc"] for n in ("ours", "hf"))
  assert ours_r["acc,none"] == hf_r["acc,none"]
  assert ours_r["acc_norm,none"] == hf_r["acc_norm,none"]
  ours_s, hf_s = (out[n]["samples"]["gemma2_jax_ko_mc"] for n in ("ours", "hf"))
  assert len(ours_s) == 8
  for a, b in zip(ours_s, hf_s, strict=True):
    np.testing.assert_allclose([float(r[0][0]) for r in a["resps"]],
                               [float(r[0][0]) for r in b["resps"]], rtol=RTOL)


def test_from_params_in_memory(models):
  """The training integration's entry: an in-memory params tree + config + tokenizer."""
  from gemma2_jax.benchmarks.harness import Gemma2JaxLM

  ours, _ = models
  lm = Gemma2JaxLM.from_params(ours.cfg, ours.params, ours.tok, mesh=ours.mesh, batch_size=4,
                               max_length=MAX_LENGTH)
  args = [(t,) for t in TEXTS[1:]]
  np.testing.assert_allclose(
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", args), disable_tqdm=True),
    ours.loglikelihood_rolling(requests("loglikelihood_rolling", args), disable_tqdm=True),
    rtol=RTOL)


def test_benchmark_hook_scores_the_params_in_place(models, monkeypatch, tmp_path):
  """The training hook: due every N steps, `bench/<task>/<metric>` equal to simple_evaluate's, and the
  params it was given bit-identical afterwards (read in place, never donated)."""
  import jax

  from gemma2_jax.training.benchmark_hook import BenchmarkHook, BenchmarksConfig

  ours, _ = models
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.chdir(TASKS)  # the task's data_files are relative to it
  config = BenchmarksConfig(tasks=(str(TASKS / "ko_mc.yaml"),), every=2, limit=5, batch_size=4,
                            max_length=MAX_LENGTH)
  hook = BenchmarkHook(config, ours.cfg, ours.tok, mesh=ours.mesh)
  assert [d for d in range(7) if hook.due(d)] == [2, 4, 6]
  before = jax.device_get(ours.params)
  got = hook(2, ours.params)
  assert sorted(got) == ["bench/gemma2_jax_ko_mc/acc", "bench/gemma2_jax_ko_mc/acc_norm"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours.params), before)
  assert all(not x.is_deleted() for x in jax.tree.leaves(ours.params))
  assert hook(4, ours.params) == got == hook.last  # the same params, programs and figures

  from gemma2_jax.benchmarks.evaluate import Tasks, evaluate, metrics

  want = evaluate(ours, Tasks(config.tasks), limit=5)
  assert metrics(want) == got
  assert got["bench/gemma2_jax_ko_mc/acc"] == want["results"]["gemma2_jax_ko_mc"]["acc,none"]

  off = BenchmarkHook(BenchmarksConfig(), ours.cfg, ours.tok)
  assert not any(off.due(d) for d in range(5)) and off(2, ours.params) == {}
  with pytest.raises(Exception, match="task file .*missing.yaml does not exist"):
    BenchmarkHook(BenchmarksConfig(tasks=(str(TASKS / "missing.yaml"),), every=1), ours.cfg, ours.tok)


def test_model_args_win_over_lm_eval_flags(monkeypatch):
  """lm_eval's CLI passes its --batch_size (default 1) beside --model_args: no clash, model_args win."""
  from gemma2_jax.benchmarks.harness import Gemma2JaxLM

  seen = {}
  monkeypatch.setattr(Gemma2JaxLM, "__init__", lambda self, **kw: seen.update(kw))
  Gemma2JaxLM.create_from_arg_string("checkpoint=c,batch_size=8",
                                     {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
  assert seen == {"checkpoint": "c", "batch_size": 8, "device": "cpu"}


def test_benchmarks_config():
  from gemma2_jax.errors import UserError
  from gemma2_jax.training.benchmark_hook import BenchmarksConfig

  assert BenchmarksConfig(tasks="kobest_copa,haerae", every=3).tasks == ("kobest_copa", "haerae")
  assert BenchmarksConfig(tasks=["kobest_copa"], every=3).enabled  # a list from ml_collections
  assert not BenchmarksConfig(tasks=("kobest_copa",)).enabled  # every 0: off
  with pytest.raises(UserError, match="tasks is empty"):
    BenchmarksConfig(every=5)
  with pytest.raises(UserError, match="every must be >= 0"):
    BenchmarksConfig(tasks=("kobest_copa",), every=-1)


def test_benchmarks_during_training_log_at_their_steps_and_leave_the_run_unchanged(tmp_path, monkeypatch):
  """train.benchmarks: bench/<task>/<metric> rows in metrics.jsonl after steps 2 and 4 of 4, in the
  summary, and the same losses as the run without them (scoring reads the params, changes nothing)."""
  import jax

  from gemma2_jax.training.experiment import from_config
  from gemma2_jax.training.loop import Trainer
  from tests.tiny import TOKENIZER, tiny_experiment

  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  task = tmp_path / "ko_mc.yaml"  # the shipped task with its data file by absolute path
  task.write_text((TASKS / "ko_mc.yaml").read_text().replace("test: mc.json", f"test: {TASKS / 'mc.json'}"))

  def run(workdir, **bench):
    c = tiny_experiment(steps=4, log_every=1, seq_len=32)
    c.data.tokenizer = str(TOKENIZER)
    c.model.vocab_size = 1024
    c.checkpoint.export_hf = False
    c.train.benchmarks.update(bench)
    summary = Trainer(from_config(c, num_devices=jax.device_count()), workdir).run()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows

  summary, rows = run(tmp_path / "bench", tasks=(str(task),), every=2, limit=4, batch_size=8)
  _, plain = run(tmp_path / "plain")
  bench = {r["step"]: r for r in rows if any(k.startswith("bench/") for k in r)}
  assert sorted(bench) == [2, 4]
  assert {k for k in bench[2] if k.startswith("bench/")} == {"bench/gemma2_jax_ko_mc/acc",
                                                            "bench/gemma2_jax_ko_mc/acc_norm"}
  assert summary["bench/gemma2_jax_ko_mc/acc"] == bench[4]["bench/gemma2_jax_ko_mc/acc"]
  losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  assert losses == [(r["step"], r["loss"]) for r in plain if "loss" in r] and len(losses) == 4

"""The lm-eval backend as a multi-process job (jax.distributed + gloo on CPU, 2 processes x 2 devices,
each batch's rows split over the processes): the results are those of one process on the same mesh,
for all three request types (a multiple-choice task, a rolling loglikelihood task, a generation
task), and only process 0 writes them.

The default run goes through the Python entry (`benchmarks.evaluate`, what the training hook uses: no
indexing of lm_eval's 15k built-in tasks, ~10 s a process); the slow one through the command line,
`python -m gemma2_jax.benchmarks --distributed ...`, whose results and samples files it compares.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import multiprocess as mp

pytest.importorskip("lm_eval", reason="needs the eval extra (pip install -e '.[eval]')")

HERE = Path(__file__).resolve().parent
SP_MODEL = HERE / "data" / "ko_sp1024_chat.model"
DATA = HERE / "data" / "lm_eval" / "mc.json"
TASKS = ("gemma2_jax_mp_mc", "gemma2_jax_mp_rolling", "gemma2_jax_mp_gen")
# batch_size 4: 2 rows per process, 1 per data shard (tensor=2 inside each process), as one process
# on the same 4-device mesh batches them. max_length 15: every scored row in the 16-token bucket (one
# compile; longer contexts left-truncated, several rolling windows).
MODEL_ARGS = "dtype=float32,batch_size=4,max_length=15,max_gen_toks=8"
# Fields of a results file that differ from run to run.
VOLATILE = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash",
            "upper_git_hash")


def _task_files(folder: Path) -> list[Path]:
  data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA}\ntest_split: test\n"
  bodies = {
    "mc": 'output_type: multiple_choice\ndoc_to_text: "질문: {{question}}\\n답:"\n'
          "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \" \"\n"
          "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
               'doc_to_target: "{{question}} {{choices[label]}}"\n'
               "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
               "  - metric: bits_per_byte\n",
    "gen": 'output_type: generate_until\ndoc_to_text: "질문: {{question}}\\n답:"\n'
           'doc_to_target: "{{choices[label]}}"\n'
           'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
           "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
           "    higher_is_better: true\n",
  }
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for kind, body in bodies.items():
    path = folder / f"mp_{kind}.yaml"
    path.write_text(f"task: gemma2_jax_mp_{kind}\n{data}{body}metadata:\n  version: 1.0\n")
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  torch = pytest.importorskip("torch")  # here: the workers (this module) do without it
  from gemma2_jax.model.config import tiny
  from tests.hf_utils import random_hf_model

  path = tmp_path_factory.mktemp("lm_eval_mp")
  model = random_hf_model(tiny(vocab_size=1024, sliding_window=8), seed=1, scale=0.3)
  with torch.no_grad():
    model.model.embed_tokens.weight.mul_(0.2)
  model.save_pretrained(path / "hf")
  shutil.copy(SP_MODEL, path / "hf" / "tokenizer.model")
  return path / "hf", _task_files(path / "tasks"), path


def _env(root: Path) -> dict:
  return {"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "datasets"),
          "TOKENIZERS_PARALLELISM": "false"}


def _worker_cmd(ckpt, tasks, out) -> list[str]:
  return [sys.executable, "-m", "tests.test_lm_eval_multiprocess", str(ckpt), str(out),
          *map(str, tasks)]


def _one_process(cmd, root) -> subprocess.CompletedProcess:
  """The same command in one process with the 2 x 2 devices: the same global mesh."""
  r = subprocess.run(cmd, cwd=mp.ROOT, env=mp.env(4, **_env(root)), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def test_two_processes_give_one_process_results(inputs, tmp_path, monkeypatch):
  """Scoring (multiple choice, rolling): 2 processes x 2 devices against this process on 4 of its
  devices, the same mesh (data=2 x tensor=2)."""
  import jax

  from gemma2_jax.parallel.sharding import make_mesh

  ckpt, tasks, root = inputs
  tasks = tasks[:2]
  for key, value in _env(root).items():
    monkeypatch.setenv(key, value)
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  want = tmp_path / "one.json"
  _results(str(ckpt), want, list(map(str, tasks)), mesh=mesh)  # also fills the datasets cache
  results = json.loads(want.read_text())
  assert sorted(results["results"]) == sorted(TASKS[:2])
  assert {len(results["samples"][t]) for t in TASKS[:2]} == {8}

  got = tmp_path / "two.json"
  mp.run(lambda pid: _worker_cmd(ckpt, tasks, got if pid == 0 else tmp_path / "two_p1.json"), 2,
         2, cli=False, extra_env=_env(root), timeout=300)
  assert got.read_text() == want.read_text()
  assert not (tmp_path / "two_p1.json").exists()  # process 0 alone writes


def _results_files(folder: Path) -> dict[str, str]:
  """name without its timestamp -> content (results_*.json without its run-time fields)."""
  out = {}
  for path in sorted(folder.rglob("*.json*")):
    stem = path.name.rsplit("_", 1)[0]  # results_2026-..., samples_<task>_2026-...
    text = path.read_text()
    if path.name.startswith("results_"):
      data = json.loads(text)
      for key in VOLATILE:
        data.pop(key, None)
      text = json.dumps(data, sort_keys=True, ensure_ascii=False)
    out[stem] = text
  return out


@pytest.mark.slow
def test_command_line_with_two_processes_writes_what_one_writes(inputs, tmp_path):
  ckpt, tasks, root = inputs

  def cmd(out):
    return [sys.executable, "-m", "gemma2_jax.benchmarks", "--model", "gemma2_jax", "--model_args",
            f"checkpoint={ckpt},{MODEL_ARGS}", "--tasks", ",".join(TASKS), "--include_path",
            str(tasks[0].parent), "--output_path", str(out), "--log_samples"]

  _one_process(cmd(tmp_path / "one"), root)
  want = _results_files(tmp_path / "one")
  assert sorted(want) == ["results", *sorted(f"samples_{t}" for t in TASKS)]
  (_, out0, _), (_, out1, _) = mp.run(cmd(tmp_path / "two"), 2, 2, extra_env=_env(root))
  assert _results_files(tmp_path / "two") == want
  assert "gemma2_jax_mp_mc" in out0 and "gemma2_jax_mp_mc" not in out1  # the table: process 0's


@pytest.mark.slow
def test_processes_with_other_requests_refuse_together(inputs, tmp_path):
  """Each process reads the task data itself; a copy that differs is one error on every process (the
  digest exchange before any batch), not a hang in mismatched programs."""
  ckpt, tasks, root = inputs
  other = tmp_path / "other" / tasks[0].name
  other.parent.mkdir()
  other.write_text(tasks[0].read_text().replace("질문:", "문제:"))
  results = mp.wait(mp.launch(lambda pid: _worker_cmd(ckpt, [other if pid else tasks[0]],
                                                      tmp_path / "out.json"),
                              2, 2, cli=False, extra_env=_env(root)), 300)
  for rc, _, err in results:
    assert rc != 0 and "process 1 has other score requests than process 0" in err, err[-3000:]
  assert not (tmp_path / "out.json").exists()


def _results(ckpt: str, out, tasks: list[str], mesh=""):
  """The tasks' results and samples (all but the run-time fields), written by process 0 to `out`."""
  import jax
  from lm_eval.utils import handle_non_serializable

  from gemma2_jax.benchmarks.evaluate import Tasks, evaluate
  from gemma2_jax.benchmarks.harness import Gemma2JaxLM

  lm = Gemma2JaxLM(checkpoint=ckpt, mesh=mesh, progress=False,
                   **dict(kv.split("=") for kv in MODEL_ARGS.split(",")))
  results = evaluate(lm, Tasks(tasks), log_samples=True)
  for key in (*VOLATILE, "config"):  # config: the model object's repr
    results.pop(key, None)
  if jax.process_index() == 0:
    Path(out).write_text(json.dumps(results, default=handle_non_serializable, sort_keys=True,
                                    ensure_ascii=False))


if __name__ == "__main__":  # one process of a job started by tests.multiprocess.launch
  mp.worker_init()
  _results(sys.argv[1], sys.argv[2], sys.argv[3:])

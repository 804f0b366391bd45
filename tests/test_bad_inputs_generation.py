"""Bad input, second round: `sample`, `evaluate` and their files, as a user runs them. Each ends with
exactly one `error: ...` line as the last line of stderr, exit 1, and every pre-existing file
byte-identical (the numbers are those of the issue that collected them). The runs share one trained
workdir (2 steps of a 2-layer d=32 model), copied by the tests that damage it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli import DATA, assert_one_error, cli, snapshot, train

CORPUS = DATA / "ko" / "1809899.txt"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad_generation") / "run"
  proc = train(path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return path


def sample(workdir, *args, devices: int = 1):
  return cli("sample", "--checkpoint", workdir, "--max_new_tokens", 2, "--no_progress", *args,
             devices=devices)


def prompts_file(tmp_path, *records, name="prompts.jsonl") -> Path:
  path = tmp_path / name
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return path


# --- 1. an unrelated --output file is never "repaired" ---------------------------------------------

def test_output_that_is_not_ours_is_refused_untouched(workdir, tmp_path):
  prompts = prompts_file(tmp_path, {"prompt": "안녕"})
  other = tmp_path / "results.json"
  other.write_text(json.dumps({"accuracy": 0.5, "note": "written by json.dump: no newline"}))
  before = snapshot(tmp_path)
  proc = sample(workdir, "--prompts", prompts, "--output", other)
  assert_one_error(proc, f"{other}:1 is not an output line of this command", "choose another --output")
  assert snapshot(tmp_path) == before


def test_output_cut_off_mid_record_is_ours_and_repaired(tmp_path):
  from gemma2_jax.inference.prompts import read_done

  prompts = ["안녕", "하세요"]
  whole = json.dumps({"index": 1, "prompt": "하세요", "completion": "x"}, ensure_ascii=False)
  out = tmp_path / "out.jsonl"
  for cut in ('{"ind', '{"index": 0, "prompt": "안', '{"index": 0, "prompt": "안녕", "prompt_ids": [2, '):
    out.write_text(whole + "\n" + cut)
    assert read_done(str(out), prompts) == {1}
    assert out.read_text() == whole + "\n"
  for foreign in ('{"index": 0, "prompt": "other', '{"index": 7, "prompt": "', '{"a": 1}', "x"):
    out.write_text(whole + "\n" + foreign)
    with pytest.raises(ValueError, match=r"out.jsonl:2 is not an output line"):
      read_done(str(out), prompts)
    assert out.read_text() == whole + "\n" + foreign


# --- 2. dtypes: floats only, the same aliases on every flag --------------------------------------

@pytest.mark.parametrize("command,flag", [("sample", "--dtype"), ("sample", "--cache_dtype"),
                                          ("evaluate", "--dtype")])
def test_non_float_dtype_is_one_line(workdir, command, flag):
  args = ["--prompt", "hi"] if command == "sample" else ["--data", CORPUS]
  proc = cli(command, "--checkpoint", workdir, *args, flag, "int8")
  assert_one_error(proc, f"argument {flag}: 'int8' is not a float dtype", "bfloat16", rc=2)


def test_dtype_aliases_are_accepted_everywhere(workdir):
  proc = sample(workdir, "--prompt", "hi", "--dtype", "fp32", "--cache_dtype", "bf16")
  assert proc.returncode == 0, proc.stderr[-3000:]


# --- 3. prompts in Parquet, and files that are neither JSONL nor Parquet --------------------------

def test_parquet_prompts_are_read(workdir, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = tmp_path / "prompts.parquet"
  pq.write_table(pa.table({"prompt": ["안녕", "하세요"], "other": [1, 2]}), path)
  out = tmp_path / "out.jsonl"
  proc = sample(workdir, "--prompts", path, "--output", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["안녕", "하세요"]


def test_binary_prompts_file_names_file_and_formats(workdir, tmp_path):
  path = tmp_path / "prompts.bin"
  path.write_bytes(b"\x00\x84\xff binary\n")
  proc = sample(workdir, "--prompts", path)
  assert_one_error(proc, f"{path}:1: not UTF-8 text", "JSONL", "Parquet")


# --- 4, 5. record errors name the file and line -----------------------------------------------------

def test_message_list_without_chat_names_the_flag(workdir, tmp_path):
  path = prompts_file(tmp_path, {"prompt": "hi"}, {"prompt": [{"role": "user", "content": "hi"}]})
  proc = sample(workdir, "--prompts", path)
  assert_one_error(proc, f"{path}:2: 'prompt' is a list of messages; pass --chat")


def test_unknown_chat_role_names_file_and_line(workdir, tmp_path):
  path = prompts_file(tmp_path, {"messages": [{"role": "user", "content": "hi"}]}, {},
                      name="chat.jsonl")
  path.write_text(path.read_text().replace("{}\n", "\n" + json.dumps(
    {"messages": [{"role": "wizard", "content": "hi"}]}) + "\n"))
  proc = sample(workdir, "--chat", "--prompts", path, "--tokenizer", DATA / "ko_sp1024_chat.model")
  assert_one_error(proc, f"{path}:3: message 0 has unknown role 'wizard'")


# --- 6. a workdir whose config.json is damaged: the real cause first -------------------------------

@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_workdir_config_not_json_says_so(workdir, tmp_path, command):
  run = Path(shutil.copytree(workdir, tmp_path / "run"))
  (run / "config.json").write_text('{"model": ')
  before = snapshot(run)
  args = ["--prompt", "hi"] if command == "sample" else ["--data", CORPUS]
  proc = cli(command, "--checkpoint", run, *args)
  assert_one_error(proc, f"{run / 'config.json'} is not valid JSON", "restore it with cp")
  assert snapshot(run) == before


# --- 7. one check of mesh and batch for every command -----------------------------------------------

@pytest.mark.parametrize("args,message", [
  (["--batch", "3"], "--batch of 3 rows is not divisible by the 4 batch shards of the mesh (data=4)"),
  (["--mesh", "data=8"], "hold 8 devices but 4 are present"),
], ids=["batch", "mesh"])
def test_evaluate_mesh_and_batch(workdir, args, message):
  proc = cli("evaluate", "--checkpoint", workdir, "--data", CORPUS, "--no_progress", *args, devices=4)
  assert_one_error(proc, message)

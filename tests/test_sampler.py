"""The KV-cache sampler: HF parity of greedy decoding, sampling statistics, stopping, compiles, sharding."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma2_jax import checkpoint
from gemma2_jax.data.chat import render_prompt
from gemma2_jax.data.tokenizer import PAD_ID
from gemma2_jax.inference.sampler import Sampler, SamplingConfig, cache_bytes, generate, results
from gemma2_jax.model.config import tiny
from gemma2_jax.parallel.sharding import make_mesh
from tests.hf_utils import random_hf_model

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "ko_sp1024.model"
WINDOW = 6
# Different lengths (left padding inside one bucket), one longer than the window.
PROMPTS = [[2, 5, 9, 11], [2, 40], [2, 7, 7, 7, 7, 7, 7, 8, 9, 10, 11, 12, 13]]
N_NEW = 40  # far past the window: the local layers' 6-slot ring wraps several times


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = tiny(vocab_size=1024, sliding_window=WINDOW)
  model = random_hf_model(cfg, seed=1, scale=0.3)
  with torch.no_grad():  # a smaller embedding: varied continuations instead of one repeated token
    model.model.embed_tokens.weight.mul_(0.2)
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  shutil.copy(TOKENIZER, path / "tokenizer.model")
  return path, model


@pytest.fixture(scope="module")
def sampler(hf_dir):
  model = checkpoint.load_model(hf_dir[0])
  return Sampler(model.config, model.params())


def greedy(n=N_NEW, stop_tokens=()):
  return SamplingConfig(max_new_tokens=n, temperature=0.0, stop_tokens=stop_tokens,
                        cache_dtype="float32")


def test_greedy_matches_hf_generate(hf_dir, sampler):
  _, hf = hf_dir
  outs = sampler(PROMPTS, greedy())
  for prompt, out in zip(PROMPTS, outs, strict=True):
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=N_NEW,
                      min_new_tokens=N_NEW, output_logits=True, return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, len(prompt):].tolist()
    assert out.tokens == ref_tokens, (prompt, out.tokens, ref_tokens)
    ref_logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                    for step, t in zip(ref.logits, ref_tokens, strict=True)]
    np.testing.assert_allclose(out.logprobs, ref_logprobs, atol=1e-4)
  assert len(set(outs[0].tokens)) > 5  # a real continuation, not one token repeated


def test_cache_is_a_window_ring_for_local_layers(sampler):
  state = sampler.start(PROMPTS, greedy())
  (local_k, _), (global_k, _) = state.caches
  P, B = 2, len(PROMPTS)
  assert local_k.shape == (P, B, WINDOW, 2, 16)
  assert global_k.shape == (P, B, 16 + N_NEW, 2, 16)  # prompt bucket 16 + new tokens
  # Slots hold positions, padding is -1: row 1 (2 tokens in a 16-bucket) has only 2 real slots.
  assert sorted(np.asarray(state.global_pos_BS[1])[:16].tolist())[-3:] == [-1, 0, 1]
  b = cache_bytes(tiny(num_layers=42, sliding_window=4096), batch=1, length=8192)
  assert b["ring"] / b["full_length"] == pytest.approx(0.75)


def test_top_k_1_is_greedy(sampler):
  ref = sampler(PROMPTS, greedy(12))
  got = sampler(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=1, stop_tokens=(),
                                        cache_dtype="float32"), seed=7)
  assert [r.tokens for r in got] == [r.tokens for r in ref]


def _first_step(sampler, sampling, rows):
  """Logits of the first token and `rows` one-step samples of the same prompt (row ids 0..n-1)."""
  state = sampler.start([PROMPTS[0]] * rows, sampling)
  logits = np.asarray(state.logits_BV[0], np.float64)
  state = sampler.continue_(state, sampling)
  return logits, np.asarray(state.tokens_BN[:, 0]), np.asarray(state.logprobs_BN[:, 0])


def test_sampling_frequencies_match_softmax(sampler):
  T, n = 0.7, 4000
  sampling = SamplingConfig(max_new_tokens=1, temperature=T, stop_tokens=(), cache_dtype="float32")
  logits, tokens, logprobs = _first_step(sampler, sampling, n)
  p = np.exp(logits / T - np.logaddexp.reduce(logits / T))
  np.testing.assert_allclose(logprobs, np.log(p[tokens]), atol=1e-4)
  # Pearson chi-square over tokens expected >= 5 times (the rest pooled): with a fixed seed the
  # statistic must stay below df + 5 sqrt(2 df), far out in the chi-square tail.
  counts = np.bincount(tokens, minlength=len(p)).astype(float)
  big = n * p >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(n * p[big], n * p[~big].sum())
  chi2 = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-9)))
  df = len(obs) - 1
  assert df > 20
  assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)


def test_top_p_and_top_k_stay_in_their_sets(sampler):
  sampling = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.3, stop_tokens=(),
                            cache_dtype="float32")
  logits, tokens, logprobs = _first_step(sampler, sampling, 500)
  order = np.argsort(-logits)
  p = np.exp(logits[order] - np.logaddexp.reduce(logits))
  nucleus = order[: int(np.searchsorted(np.cumsum(p), 0.3)) + 1]
  assert set(tokens.tolist()) <= set(nucleus.tolist())
  assert len(set(tokens.tolist())) > 1
  renormalized = logits[nucleus] - np.logaddexp.reduce(logits[nucleus])
  lookup = dict(zip(nucleus.tolist(), renormalized.tolist(), strict=True))
  np.testing.assert_allclose(logprobs, [lookup[t] for t in tokens], atol=1e-4)
  sampling = SamplingConfig(max_new_tokens=1, temperature=2.0, top_k=5, stop_tokens=(),
                            cache_dtype="float32")
  _, tokens, _ = _first_step(sampler, sampling, 500)
  assert set(tokens.tolist()) <= set(order[:5].tolist())


def test_padded_vocabulary_rows_are_never_sampled(hf_dir):
  model = checkpoint.load_model(hf_dir[0])
  params = dict(model.params())
  emb = np.asarray(params["embedder"]["input_embedding"])
  # Padding rows copied from the most likely token: without masking they would be drawn often.
  padded = np.concatenate([emb, np.repeat(emb[:1] * 50, 16, axis=0)])
  params["embedder"] = {"input_embedding": padded}
  cfg = model.config.replace(vocab_size=1040, num_real_tokens=1024)
  s = Sampler(cfg, params)
  sampling = SamplingConfig(max_new_tokens=3, temperature=5.0, stop_tokens=(), cache_dtype="float32")
  state = s.continue_(s.start([PROMPTS[0]] * 200, sampling), sampling)
  assert int(np.max(state.tokens_BN)) < 1024


def test_rows_stop_independently(sampler):
  ref = [r.tokens for r in sampler(PROMPTS, greedy(20))]
  stop = ref[0][3]
  sampling = greedy(20, stop_tokens=(stop,))
  state = sampler.continue_(sampler.start(PROMPTS, sampling), sampling)
  for r, out in zip(ref, results(state, len(PROMPTS)), strict=True):
    n = r.index(stop) + 1 if stop in r else 20  # the stop token is kept
    assert out.tokens == r[:n]
  assert any(stop not in r for r in ref[1:])  # some row runs on after row 0 stopped
  tokens, logprobs = np.asarray(state.tokens_BN), np.asarray(state.logprobs_BN)
  n0 = ref[0].index(stop) + 1
  assert (tokens[0, n0:] == PAD_ID).all() and (logprobs[0, n0:] == 0).all()
  assert int(state.lengths_B[0]) == n0


def test_streaming_in_chunks_equals_one_call(sampler):
  sampling = SamplingConfig(max_new_tokens=N_NEW, temperature=0.9, top_k=50, stop_tokens=(),
                            cache_dtype="float32")
  whole = sampler(PROMPTS, sampling, seed=3)
  state = sampler.start(PROMPTS, sampling, seed=3)
  for until in range(7, N_NEW + 7, 7):
    state = sampler.continue_(state, sampling, until=until)
  assert [r.tokens for r in results(state, 3)] == [r.tokens for r in whole]


def test_prompts_in_one_bucket_compile_once(sampler):
  sampler([[2, 3, 4, 5, 6]], greedy(8), min_rows=2)
  compiled = sampler.prefill_fn._cache_size(), sampler.decode_fn._cache_size()
  for prompts in ([[2] + list(range(10, 19))], [[2, 9], [2, 8, 7, 6]]):  # same 16-token bucket
    sampler(prompts, greedy(8), min_rows=2)
  assert (sampler.prefill_fn._cache_size(), sampler.decode_fn._cache_size()) == compiled
  sampler([list(range(2, 20))], greedy(8), min_rows=2)  # the 32-token bucket is a new program
  assert sampler.prefill_fn._cache_size() == compiled[0] + 1


def test_sharded_equals_unsharded(hf_dir, sampler):
  cfg, _ = checkpoint.load_params(hf_dir[0])
  from gemma2_jax.model.transformer import LOGICAL_AXES
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding

  mesh = make_mesh({"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  cfg, params = checkpoint.load_sharded(hf_dir[0], "float32",
                                        logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES))
  sharded = Sampler(cfg, params, mesh=mesh)
  state = sharded.start(PROMPTS, greedy(16))
  assert len(state.caches[1][0].sharding.device_set) == 8
  got = results(sharded.continue_(state, greedy(16)), len(PROMPTS))
  ref = sampler(PROMPTS, greedy(16))
  assert [r.tokens for r in got] == [r.tokens for r in ref]
  np.testing.assert_allclose([r.logprobs for r in got], [r.logprobs for r in ref], atol=1e-4)


def test_chat_template_is_byte_exact():
  assert render_prompt("안녕?") == "<start_of_turn>user\n안녕?<end_of_turn>\n<start_of_turn>model\n"
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
  assert render_prompt(messages) == (
    "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_generate_api_decodes_greedy_tokens(hf_dir, sampler):
  from gemma2_jax.data.tokenizer import Tokenizer

  tok = Tokenizer(TOKENIZER)
  model = checkpoint.load_model(hf_dir[0])
  texts = generate(model, tok, ["서울은", "a"], max_new_tokens=10, cache_dtype="float32")
  ids = [[2, *tok.encode(p)] for p in ["서울은", "a"]]
  ref = sampler(ids, SamplingConfig(max_new_tokens=10, temperature=0.0, stop_tokens=(1,),
                                    cache_dtype="float32"))
  assert texts == [tok.decode(r.tokens[:-1] if r.tokens[-1:] == [1] else r.tokens) for r in ref]


def _cli(*args, check_rc=0):
  proc = subprocess.run([sys.executable, "-m", "gemma2_jax.sample", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == check_rc, proc.stderr[-3000:]
  return proc


def test_cli_prompts_file_output_and_resume(hf_dir, sampler, tmp_path):
  from gemma2_jax.data.tokenizer import Tokenizer

  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n"
                             for p in ["서울은", "a", "부산의 바다"]))
  out = tmp_path / "out.jsonl"
  _cli("--checkpoint", hf_dir[0], "--prompts", prompts, "--output", out, "--max_new_tokens", 12,
       "--batch_size", 2, "--cache_dtype", "float32", "--no_progress")
  records = sorted((json.loads(line) for line in out.read_text().splitlines()),
                   key=lambda r: r["index"])
  tok = Tokenizer(TOKENIZER)
  assert [r["prompt"] for r in records] == ["서울은", "a", "부산의 바다"]
  for r in records:
    assert r["prompt_ids"] == [2, *tok.encode(r["prompt"])]
    ref = sampler([r["prompt_ids"]], SamplingConfig(max_new_tokens=12, temperature=0.0,
                                                    stop_tokens=(1,), cache_dtype="float32"))[0]
    assert r["completion_ids"] == ref.tokens
  # A re-run after an interrupted write keeps the complete lines and redoes only what is missing.
  lines = out.read_text().splitlines(keepends=True)
  out.write_text(lines[0] + lines[1][:10])
  _cli("--checkpoint", hf_dir[0], "--prompts", prompts, "--output", out, "--max_new_tokens", 12,
       "--batch_size", 2, "--cache_dtype", "float32", "--no_progress")
  again = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
  assert again == records


@pytest.mark.parametrize("args, message", [
  (["--temperature", "-1"], "--temperature must be >= 0"),
  (["--top_p", "0"], "--top_p must be in (0, 1]"),
  (["--max_len", "8"], "exceeds the context --max_len 8"),
  (["--chat"], "has no <start_of_turn> / <end_of_turn> piece; chat data needs"),
  (["--tokenizer", "/nonexistent/t.model"], "tokenizer model not found"),
])
def test_cli_bad_input_is_one_line(hf_dir, args, message):
  proc = _cli("--checkpoint", hf_dir[0], "--prompt", "서울은", *args, check_rc=proc_rc(args))
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-2000:]


def proc_rc(args):
  return 2 if args[0] in ("--temperature", "--top_p") else 1


def test_cli_without_tokenizer_is_one_line(hf_dir, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(hf_dir[0], bare)
  (bare / "tokenizer.model").unlink()
  proc = _cli("--checkpoint", bare, "--prompt", "x", check_rc=1)
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: no tokenizer: {bare} has no tokenizer.model; pass --tokenizer PATH")


def test_cli_streams_one_prompt(hf_dir, sampler):
  from gemma2_jax.data.tokenizer import Tokenizer

  tok = Tokenizer(TOKENIZER)
  proc = _cli("--checkpoint", hf_dir[0], "--prompt", "부산의 바다", "--max_new_tokens", 20,
              "--cache_dtype", "float32")
  ref = sampler([[2, *tok.encode("부산의 바다")]], SamplingConfig(
    max_new_tokens=20, temperature=0.0, stop_tokens=(1,), cache_dtype="float32"))[0]
  assert proc.stdout == tok.decode([t for t in ref.tokens if t != 1]) + "\n"

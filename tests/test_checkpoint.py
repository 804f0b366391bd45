"""Checkpoint I/O against the reference implementation (transformers, torch CPU) on tiny models.

Every torch parameter, norm weights included, is randomized, so a mapping that drops, transposes or
mixes up a tensor changes the logits.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import gemma2_jax
from gemma2_jax import CheckpointError
from gemma2_jax.checkpoint import load_params
from gemma2_jax.model.config import tiny
from gemma2_jax.model.transformer import PADDED_LOGIT

V, L, D, N, K, H, F = 512, 4, 64, 4, 2, 16, 96  # F != D, so both Kaggle gating layouts are distinct


def _hf_config() -> transformers.Gemma2Config:
  return transformers.Gemma2Config(
    vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=N,
    num_key_value_heads=K, head_dim=H, query_pre_attn_scalar=24, sliding_window=8,
    attn_implementation="eager")


def _cfg(**overrides):
  kw = dict(vocab_size=V, num_layers=L, d_model=D, num_heads=N, num_kv_heads=K, head_dim=H,
            ffn_dim=F, query_pre_attn_scalar=24, sliding_window=8)
  return tiny(**{**kw, **overrides})


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = transformers.Gemma2ForCausalLM(_hf_config()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


@pytest.fixture(scope="module")
def tokens():
  # Longer than the sliding window (8), so local and global layers differ.
  return np.random.default_rng(0).integers(0, V, (2, 20))


@pytest.fixture(scope="module")
def ref_logits(torch_model, tokens):
  with torch.no_grad():
    return torch_model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_dir(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "model"
  torch_model.save_pretrained(path)
  return path


def _torch_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(
    path, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _jax_logits(path, tokens, **kw):
  return np.asarray(gemma2_jax.load_model(path, **kw)(tokens))


def _assert_close(got, want):
  tol = 1e-5 * np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def _all_tensors(path) -> dict:
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    out.update(load_file(f))
  return out


def _assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k


def _assert_same_params(a: dict, b: dict):
  if isinstance(a, dict):
    assert sorted(a) == sorted(b)
    for k in a:
      _assert_same_params(a[k], b[k])
  else:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- HF <-> native --------------------------------------------------------------------------------

def test_hf_logits_match_transformers(hf_dir, tokens, ref_logits):
  _assert_close(_jax_logits(hf_dir, tokens), ref_logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_native_hf_round_trip_is_bit_identical(torch_model, hf_dir, tmp_path, dtype):
  src = hf_dir
  if dtype == "bfloat16":
    src = tmp_path / "src_bf16"
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(src)
  model = gemma2_jax.load_model(src, dtype=dtype)
  gemma2_jax.save_model(model, tmp_path / "native", format="native")
  again = gemma2_jax.load_model(tmp_path / "native", dtype=dtype)
  gemma2_jax.save_model(again, tmp_path / "hf", format="hf")
  original, exported = _all_tensors(src), _all_tensors(tmp_path / "hf")
  assert next(iter(exported.values())).dtype == getattr(torch, dtype)
  _assert_same_tensors(original, exported)


def test_transformers_loads_our_hf_export(hf_dir, tokens, ref_logits, tmp_path):
  gemma2_jax.save_model(gemma2_jax.load_model(hf_dir), tmp_path / "out", format="hf")
  np.testing.assert_array_equal(_torch_logits(tmp_path / "out", tokens), ref_logits)


# --- sharded HF -----------------------------------------------------------------------------------

def test_sharded_hf_checkpoint_loads_like_single_file(torch_model, hf_dir, tmp_path):
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  _, single = load_params(hf_dir)
  _, sharded = load_params(tmp_path / "sharded")
  _assert_same_params(single, sharded)


def test_our_sharded_hf_export_loads_in_transformers(hf_dir, tokens, ref_logits, tmp_path):
  model = gemma2_jax.load_model(hf_dir)
  gemma2_jax.save_model(model, tmp_path / "out", format="hf", max_shard_bytes=100_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
  assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
  np.testing.assert_array_equal(_torch_logits(tmp_path / "out", tokens), ref_logits)
  _assert_same_tensors(_all_tensors(hf_dir), _all_tensors(tmp_path / "out"))


# --- Kaggle layout, written by hand from the torch state dict -------------------------------------

def _kaggle_tree(torch_model, gating_transposed: bool) -> dict:
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  tree = {"transformer/embedder": {"input_embedding": sd["model.embed_tokens.weight"]},
          "transformer/final_norm": {"scale": sd["model.norm.weight"]}}
  for i in range(L):
    p, t = f"model.layers.{i}.", f"transformer/layer_{i}/"
    q = sd[p + "self_attn.q_proj.weight"].reshape(N, H, D).transpose(0, 2, 1)
    k = sd[p + "self_attn.k_proj.weight"].reshape(K, H, D).transpose(0, 2, 1)
    v = sd[p + "self_attn.v_proj.weight"].reshape(K, H, D).transpose(0, 2, 1)
    gating = np.stack([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])  # (2, F, D)
    if gating_transposed:
      gating = gating.transpose(0, 2, 1)  # the released 2B's (2, D, F)
    tree[t + "attn/q_einsum"] = {"w": q}
    tree[t + "attn/kv_einsum"] = {"w": np.stack([k, v])}
    tree[t + "attn/attn_vec_einsum"] = {"w": sd[p + "self_attn.o_proj.weight"].T.reshape(N, H, D)}
    tree[t + "mlp"] = {"gating_einsum": gating, "linear": sd[p + "mlp.down_proj.weight"].T}
    for hf_name, name in [("input_layernorm", "pre_attention_norm"),
                          ("post_attention_layernorm", "post_attention_norm"),
                          ("pre_feedforward_layernorm", "pre_ffw_norm"),
                          ("post_feedforward_layernorm", "post_ffw_norm")]:
      tree[t + name] = {"scale": sd[p + hf_name + ".weight"]}
  return {k: {n: np.ascontiguousarray(a) for n, a in v.items()} for k, v in tree.items()}


@pytest.mark.parametrize("gating_transposed", [False, True], ids=["2FD_9b_27b", "2DF_2b"])
def test_kaggle_checkpoint_matches_transformers(torch_model, tokens, ref_logits, tmp_path,
                                                gating_transposed):
  path = tmp_path / "kaggle"
  ocp.PyTreeCheckpointer().save(path, _kaggle_tree(torch_model, gating_transposed))
  _assert_close(_jax_logits(path, tokens, config=_cfg()), ref_logits)


def test_kaggle_export_round_trips(torch_model, hf_dir, tmp_path):
  model = gemma2_jax.load_model(hf_dir)
  gemma2_jax.save_model(model, tmp_path / "kaggle", format="kaggle")
  _, params = load_params(tmp_path / "kaggle", config=_cfg())
  _assert_same_params(jax.tree.map(np.asarray, model.params()), params)


# --- vocab padding --------------------------------------------------------------------------------

def test_padded_vocab_loads_real_rows_and_exports_them(hf_dir, tokens, ref_logits, tmp_path):
  cfg = _cfg(vocab_size=V + 16, num_real_tokens=V)
  model = gemma2_jax.load_model(hf_dir, config=cfg)
  emb = np.asarray(model.params()["embedder"]["input_embedding"])
  assert emb.shape == (V + 16, D) and not emb[V:].any()
  logits = np.asarray(model(tokens))
  _assert_close(logits[..., :V], ref_logits)
  assert (logits[..., V:] == PADDED_LOGIT).all()
  gemma2_jax.save_model(model, tmp_path / "out", format="hf")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == V
  _assert_same_tensors(_all_tensors(hf_dir), _all_tensors(tmp_path / "out"))


# --- bad input: one clear CheckpointError naming the tensor / file --------------------------------

def _copy(hf_dir, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(hf_dir, dst)
  return dst


def _rewrite(path, edit):
  tensors = _all_tensors(path)
  edit(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_truncated_safetensors(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  f = path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated.*tensor 'model\."):
    load_params(path)


def test_mismatched_shape(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  name = "model.layers.1.self_attn.q_proj.weight"

  def edit(t):
    t[name] = t[name][:, :60].contiguous()
  _rewrite(path, edit)
  with pytest.raises(CheckpointError,
                     match=rf"'{name}': shape \(64, 60\) does not match \(64, 64\)"):
    load_params(path)


def test_transposed_square_tensor_is_refused(hf_dir, tmp_path):
  # q_proj is (N*H, D) = (64, 64) here: a same-size wrong layout must not load silently.
  path = _copy(hf_dir, tmp_path)
  name = "model.layers.0.mlp.down_proj.weight"  # (D, F) = (64, 96)

  def edit(t):
    t[name] = t[name].T.contiguous()
  _rewrite(path, edit)
  with pytest.raises(CheckpointError, match=rf"'{name}': shape \(96, 64\)"):
    load_params(path)


def test_missing_tensor(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  _rewrite(path, lambda t: t.pop("model.layers.2.post_feedforward_layernorm.weight"))
  with pytest.raises(CheckpointError,
                     match=r"'model\.layers\.2\.post_feedforward_layernorm\.weight' is missing"):
    load_params(path)


def test_unexpected_tensor(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  _rewrite(path, lambda t: t.update({"model.layers.4.mlp.up_proj.weight": torch.zeros(F, D)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.4\.mlp\.up_proj"):
    load_params(path)


def test_wrong_vocab(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  name = "model.embed_tokens.weight"

  def edit(t):
    t[name] = t[name][:500].contiguous()
  _rewrite(path, edit)
  with pytest.raises(CheckpointError, match=rf"'{name}': shape \(500, 64\).*vocab_size=512"):
    load_params(path)
  # A padded config accepts exactly num_real_tokens rows, not fewer.
  with pytest.raises(CheckpointError, match=rf"'{name}': shape \(512, 64\).*num_real_tokens=511"):
    load_params(hf_dir, config=_cfg(vocab_size=V + 16, num_real_tokens=V - 1))


def test_other_model_type(hf_dir, tmp_path):
  path = _copy(hf_dir, tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  with pytest.raises(CheckpointError, match=r"model_type='llama'"):
    load_params(path)


class _Bomb:
  """Unpickling this creates a marker file: proof that the loader ran pickle."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (str(self.marker), "w"))


def test_pickle_weights_are_refused_and_never_unpickled(hf_dir, tmp_path):
  path = tmp_path / "bin"
  path.mkdir()
  shutil.copy(hf_dir / "config.json", path)
  marker = tmp_path / "unpickled"
  (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(marker)))
  with pytest.raises(CheckpointError, match=r"pickle.*never loaded"):
    load_params(path)
  with pytest.raises(CheckpointError, match=r"pickle"):
    gemma2_jax.checkpoint.stored_dtype(path)
  assert not marker.exists()


def test_nonexistent_path(tmp_path):
  with pytest.raises(CheckpointError, match=r"nope does not exist"):
    gemma2_jax.load_model(tmp_path / "nope")


def test_save_refuses_non_empty_dir_and_leaves_it_untouched(hf_dir, tmp_path):
  model = gemma2_jax.load_model(hf_dir)
  dst = _copy(hf_dir, tmp_path)
  before = {p.name: p.read_bytes() for p in dst.iterdir()}
  for fmt in ("hf", "native", "kaggle"):
    with pytest.raises(CheckpointError, match=r"copy already exists and is not empty"):
      gemma2_jax.save_model(model, dst, format=fmt)
  assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp dirs left behind


def test_bf16_stored_dtype_is_detected(torch_model, tmp_path):
  copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  assert gemma2_jax.checkpoint.stored_dtype(tmp_path / "bf16") == np.dtype(ml_dtypes.bfloat16)

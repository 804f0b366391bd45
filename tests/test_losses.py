"""Chunked CE / distillation losses against a float64 NumPy reference with hand-derived gradients.

The reference is unchunked and independent of gemma2_jax.losses: logits = softcap(H E^T) with padded
rows at -1e9, explicit divergence formulas, and gradients by the chain rule written out:
  dD/du = q * g - q * sum(q * g),  u = z / T the tempered student logits, g = dD/dq
  (soft_ce, forward KL: q g = -p;  reverse KL: g = log q - log p + 1;  JSD: g = (1 - beta)(log q - log m)),
  dz/da = 1 - (z / cap)^2 (soft-cap), dL/dH = G E, dL/dE = G^T H with G = dL/da.
For the top-k teacher the student's bucket masses are Q_b = sum_{j in b} q_j, so q_j g_j = q_j g_b(j).
The losses under test run in float64 (jax.enable_x64) so the comparison can be at rel 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.distill.config import DistillConfig, distill_schedule
from gemma2_jax.model import losses as L
from gemma2_jax.model.config import tiny

V, N_REAL, D_S, D_T, B, T = 16, 13, 8, 12, 2, 7
CAP_S, CAP_T = 5.0, 8.0  # small soft-caps so tanh is far from linear at these logit scales


def student_cfg(**kw):
  return tiny(vocab_size=V, num_real_tokens=N_REAL, d_model=D_S, final_softcap=CAP_S, **kw)


def teacher_cfg(**kw):
  return tiny(vocab_size=V, num_real_tokens=N_REAL, d_model=D_T, final_softcap=CAP_T, **kw)


def make_inputs(seed=0):
  r = np.random.default_rng(seed)
  return dict(E=r.normal(size=(V, D_S)), H=r.normal(size=(B, T, D_S)),
              Et=r.normal(size=(V, D_T)), Ht=1.5 * r.normal(size=(B, T, D_T)),
              y=r.integers(0, N_REAL, size=(B, T)),
              w=r.integers(0, 2, size=(B, T)).astype(np.float64) * r.uniform(0.5, 2.0, size=(B, T)))


# ------------------------------------------------------------------------------------------------
# NumPy float64 reference


def np_logits(E, H, cap):
  a = H.reshape(-1, H.shape[-1]) @ E.T
  z = a if cap is None else cap * np.tanh(a / cap)
  dz_da = np.ones_like(a) if cap is None else 1.0 - (z / cap) ** 2
  real = np.arange(E.shape[0]) < N_REAL
  return np.where(real, z, -1e9), np.where(real, dz_da, 0.0)


def np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_div(loss, logq, logp, beta):
  """Per-row D and g = dD/dq (q the student's bucket probabilities, treated as free variables)."""
  if loss == "jsd" and beta in (0.0, 1.0):
    loss = "forward_kl" if beta == 0.0 else "reverse_kl"
  p, q = np.exp(logp), np.exp(logq)
  if loss in ("soft_ce", "forward_kl"):
    g = np.where(p > 0, -p / np.maximum(q, 1e-300), 0.0)
    d = -(p * logq).sum(-1) + (0.0 if loss == "soft_ce" else (p * logp).sum(-1))
  elif loss == "reverse_kl":
    d, g = (q * (logq - logp)).sum(-1), logq - logp + 1.0
  else:
    m = beta * p + (1 - beta) * q
    logm = np.log(np.where(m > 0, m, 1.0))  # m = 0 only where p = q = 0: those terms are 0 log 0 = 0
    d = beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)
    g = np.where(m > 0, (1 - beta) * (logq - logm), 0.0)
  return d, g


def np_reference(x, *, loss, beta=0.5, temp=1.0, alpha=1.0, topk=None):
  """Returns (sums dict, dL/dH, dL/dE) for L = sums['loss']. topk = (logp [N,k], ids [N,k]) or None."""
  z, dz_da = np_logits(x["E"], x["H"], CAP_S)
  y, w = x["y"].reshape(-1), x["w"].reshape(-1)
  n = np.arange(len(y))
  logq1 = np_log_softmax(z)
  u_logq = np_log_softmax(z / temp)
  q = np.exp(u_logq)
  if topk is None:
    zt, _ = np_logits(x["Et"], x["Ht"], CAP_T)
    logp1 = np_log_softmax(zt)
    d, g_full = np_div(loss, u_logq, np_log_softmax(zt / temp), beta)
    kl1, _ = np_div("forward_kl", logq1, logp1, 0.0)
    teacher_top1, teacher_lp_y = zt.argmax(-1), logp1[n, y]
  else:
    lp, ids = topk
    k = ids.shape[1]
    bucket = np.full(z.shape, k)  # bucket index of every vocabulary entry; k = tail
    bucket[n[:, None], ids] = np.arange(k)
    real = np.arange(V) < N_REAL

    def bucket_logs(logq_full, temperature):
      Q = np.zeros((len(y), k + 1))
      np.add.at(Q, (np.repeat(n, V), bucket.reshape(-1)), np.exp(logq_full).reshape(-1))
      tail_mass = np.clip(1 - np.exp(lp).sum(-1), 0, 1) * ((bucket == k) & real).any(-1)
      P = np.concatenate([np.exp(lp), tail_mass[:, None]], -1) ** (1 / temperature)
      P /= P.sum(-1, keepdims=True)
      with np.errstate(divide="ignore"):
        return np.log(Q), np.log(P), tail_mass

    logQ, logP, _ = bucket_logs(u_logq, temp)
    # Empty buckets (tail with nothing in it) contribute 0: give them equal finite logs.
    empty = np.isinf(logQ) & np.isinf(logP)
    logQ, logP = np.where(empty, -1e9, logQ), np.where(empty, -1e9, logP)
    d, g_b = np_div(loss, logQ, logP, beta)
    g_full = g_b[n[:, None], bucket]
    lq1, lp1, tail1 = bucket_logs(logq1, 1.0)
    e1 = np.isinf(lq1) & np.isinf(lp1)
    kl1, _ = np_div("forward_kl", np.where(e1, -1e9, lq1), np.where(e1, -1e9, lp1), 0.0)
    teacher_top1 = ids[n, lp.argmax(-1)]
    hit = ids == y[:, None]
    teacher_lp_y = np.where(hit.any(-1), (lp * hit).sum(-1), np.log(np.maximum(tail1, 1e-300)))
  qg = q * g_full
  dD_du = qg - q * qg.sum(-1, keepdims=True)
  onehot = np.eye(V)[y]
  nll = -logq1[n, y]
  dL_dz = w[:, None] * (alpha * temp * dD_du + (1 - alpha) * (np.exp(logq1) - onehot))
  G = dL_dz * dz_da
  H2 = x["H"].reshape(-1, D_S)
  kd = temp**2 * d
  sums = {"loss": (w * (alpha * kd + (1 - alpha) * nll)).sum(), "kd": (w * kd).sum(),
          "nll": (w * nll).sum(), "correct": (w * (z.argmax(-1) == y)).sum(), "weight": w.sum(),
          "kl": (w * kl1).sum(), "teacher_nll": -(w * teacher_lp_y).sum(),
          "agree": (w * (z.argmax(-1) == teacher_top1)).sum()}
  return sums, (G @ x["E"]).reshape(x["H"].shape), G.T @ H2


def np_topk(x, k):
  zt, _ = np_logits(x["Et"], x["Ht"], CAP_T)
  lp = np_log_softmax(zt)
  ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
  return np.take_along_axis(lp, ids, -1), ids


# ------------------------------------------------------------------------------------------------
# JAX side. XLA:CPU compile time (~1 s a program) dominates, so each test builds ONE jitted program
# holding all the variants it checks.


def run_many(x, variants, *, scfg=None, tcfg=None):
  """[(sums, dloss/dH, dloss/dE)] from gemma2_jax.losses, one per variant dict (loss, beta, temperature,
  alpha, chunk_size, and `topk` = (logp [N, k], ids [N, k]) for the top-k teacher)."""
  scfg, tcfg = scfg or student_cfg(), tcfg or teacher_cfg()
  y, w, Et, Ht = (jnp.asarray(x[k]) for k in ("y", "w", "Et", "Ht"))

  def one(H, E, variant):
    kw = {"chunk_size": 3, **variant}
    topk = kw.pop("topk", None)

    def f(H, E):
      if topk is None:
        sums = L.distill_sums(scfg, E, H, tcfg, Et, Ht, y, w, **kw)
      else:
        lp, ids = (jnp.asarray(a.reshape(B, T, -1)) for a in topk)
        sums = L.topk_distill_sums(scfg, E, H, lp, ids, y, w, **kw)
      return sums["loss"], sums

    (_, sums), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(H, E)
    return sums, *grads

  outs = jax.jit(lambda H, E: [one(H, E, v) for v in variants])(jnp.asarray(x["H"]), jnp.asarray(x["E"]))
  return [({k: np.asarray(v) for k, v in sums.items()}, np.asarray(dH), np.asarray(dE))
          for sums, dH, dE in outs]


def assert_close(actual, expected, rtol=1e-6, atol=1e-12, msg=""):
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(1.0, np.abs(expected).max()),
                             err_msg=msg)


def assert_matches_reference(x, variants, **run_kw):
  for kw, (sums, dH, dE) in zip(variants, run_many(x, variants, **run_kw), strict=True):
    ref, ref_dH, ref_dE = np_reference(x, loss=kw["loss"], beta=kw.get("beta", 0.5),
                                       temp=kw.get("temperature", 1.0), alpha=kw.get("alpha", 1.0),
                                       topk=kw.get("topk"))
    msg = str({k: v for k, v in kw.items() if k != "topk"})
    assert set(sums) == set(ref), msg
    for key in ref:
      assert_close(sums[key], ref[key], msg=f"{key} {msg}")
    assert_close(dH, ref_dH, msg=f"dH {msg}")
    assert_close(dE, ref_dE, msg=f"dE {msg}")


def test_distill_matches_numpy_reference():
  variants = [
    dict(loss="soft_ce"),
    dict(loss="soft_ce", temperature=2.0, alpha=0.5),
    dict(loss="forward_kl", temperature=2.0, alpha=0.5),
    dict(loss="reverse_kl", temperature=2.0, alpha=0.5),
    *[dict(loss="jsd", beta=b, temperature=2.0, alpha=0.5) for b in (0.1, 0.5, 0.9)],
    dict(loss="jsd", beta=0.5),
  ]
  with jax.enable_x64(True):
    assert_matches_reference(make_inputs(), variants)


def test_topk_matches_numpy_reference():
  x = make_inputs(1)
  topk = np_topk(x, 4)
  variants = [dict(loss=name, temperature=2.0, alpha=0.5, topk=topk)
              for name in ("soft_ce", "forward_kl", "reverse_kl")]
  variants += [dict(loss="jsd", beta=0.5, temperature=2.0, alpha=0.5, topk=topk),
               dict(loss="forward_kl", topk=topk)]
  with jax.enable_x64(True):
    assert_matches_reference(x, variants)


def test_chunked_equals_unchunked():
  x = make_inputs(2)
  topk = np_topk(x, 5)
  kinds = [dict(loss="jsd", beta=0.3, temperature=1.5, alpha=0.7),
           dict(topk=topk, loss="reverse_kl", temperature=1.5, alpha=0.7)]
  sizes = [1, 3, T, T + 5]  # T = 7: 3 does not divide it
  with jax.enable_x64(True):
    outs = run_many(x, [dict(kind, chunk_size=c) for kind in kinds for c in [10**6, *sizes]])
  for i in range(len(kinds)):
    (full, full_dH, full_dE), *parts = outs[i * 5:(i + 1) * 5]
    for c, (part, dH, dE) in zip(sizes, parts, strict=True):
      for key in full:
        assert_close(part[key], full[key], rtol=1e-12, msg=f"{key} chunk {c}")
      assert_close(dH, full_dH, rtol=1e-12)
      assert_close(dE, full_dE, rtol=1e-12)


def test_teacher_equal_student_gives_zero_divergence():
  x = make_inputs(3)
  x.update(Et=x["E"], Ht=x["H"])
  scfg = student_cfg()
  variants = [dict(loss="forward_kl", temperature=2.0), dict(loss="reverse_kl", temperature=2.0),
              dict(loss="jsd", beta=0.2, temperature=2.0), dict(loss="jsd", beta=0.5), dict(loss="soft_ce")]
  with jax.enable_x64(True):
    outs = run_many(x, variants, scfg=scfg, tcfg=scfg)
  for sums, dH, dE in outs[:-1]:
    assert abs(sums["kd"]) < 1e-12 and abs(sums["kl"]) < 1e-12
    assert np.abs(dH).max() < 1e-12 and np.abs(dE).max() < 1e-12
    assert sums["agree"] == sums["weight"]
    assert_close(sums["teacher_nll"], sums["nll"])
  z, _ = np_logits(x["E"], x["H"], CAP_S)
  logq = np_log_softmax(z)
  entropy = -(np.exp(logq) * logq).sum(-1)
  assert_close(outs[-1][0]["kd"], (x["w"].reshape(-1) * entropy).sum())


def test_jsd_limits_finite_and_endpoints():
  x = make_inputs(4)
  eps = 1e-9
  with jax.enable_x64(True):
    fwd, rev, jsd0, jsd1, near0, near1 = run_many(x, [
      dict(loss="forward_kl"), dict(loss="reverse_kl"), dict(loss="jsd", beta=0.0),
      dict(loss="jsd", beta=1.0), dict(loss="jsd", beta=eps), dict(loss="jsd", beta=1 - eps)])
  assert jsd0[0]["kd"] == fwd[0]["kd"] and jsd1[0]["kd"] == rev[0]["kd"]
  # JSD / beta -> forward KL as beta -> 0, JSD / (1 - beta) -> reverse KL as beta -> 1.
  np.testing.assert_allclose(near0[0]["kd"] / eps, fwd[0]["kd"], rtol=1e-4)
  np.testing.assert_allclose(near1[0]["kd"] / eps, rev[0]["kd"], rtol=1e-4)
  with jax.enable_x64(False):  # fp32 at extreme betas: finite everywhere, padded rows included
    for sums, dH, dE in run_many(x, [dict(loss="jsd", beta=1e-7, temperature=3.0),
                                     dict(loss="jsd", beta=1 - 1e-7, temperature=3.0)]):
      assert all(np.isfinite(v).all() for v in (*sums.values(), dH, dE))


def test_topk_full_vocab_equals_forward_kl():
  x = make_inputs(5)
  temps = (1.0, 2.0)
  # k = V keeps the padded rows too; k = N_REAL keeps every real token: both leave an empty tail.
  variants = [dict(loss="forward_kl", temperature=t, topk=topk)
              for topk in (None, np_topk(x, V), np_topk(x, N_REAL)) for t in temps]
  with jax.enable_x64(True):
    outs = run_many(x, variants)
  for i, full in enumerate(outs[:2]):
    for top in (outs[2 + i], outs[4 + i]):
      for key in ("kd", "kl", "teacher_nll", "agree"):
        assert_close(top[0][key], full[0][key], msg=key)
      assert_close(top[1], full[1])
      assert_close(top[2], full[2])


def test_topk_is_a_proper_divergence():
  x = make_inputs(6)
  lp, ids = np_topk(x, 3)
  # A student whose logits are exactly chosen (identity embedding, no soft-cap): kept ids get the
  # teacher's log-probs, the tail mass is spread unevenly over the other real tokens.
  cfg = tiny(vocab_size=V, num_real_tokens=N_REAL, d_model=V, final_softcap=None)
  r = np.random.default_rng(7)
  tail = np.clip(1 - np.exp(lp).sum(-1), 0, 1)
  logits = np.full((B * T, V), -1e9)
  for i in range(B * T):
    others = np.setdiff1d(np.arange(N_REAL), ids[i])
    share = r.uniform(0.1, 1.0, size=len(others))
    logits[i, others] = np.log(tail[i] * share / share.sum())
    logits[i, ids[i]] = lp[i]
  losses = (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9))
  with jax.enable_x64(True):
    y, lp_BTk, ids_BTk = jnp.asarray(x["y"]), jnp.asarray(lp.reshape(B, T, -1)), jnp.asarray(
      ids.reshape(B, T, -1))
    one_token_weights = jnp.eye(B * T).reshape(B * T, B, T)

    def per_token_kd(H):  # [losses, B * T]: every single token's divergence
      return jnp.stack([jax.vmap(lambda w, loss=loss, beta=beta: L.topk_distill_sums(
        cfg, jnp.eye(V), H, lp_BTk, ids_BTk, y, w, loss=loss, beta=beta, chunk_size=4)["kd"])(
          one_token_weights) for loss, beta in losses])

    kd_random, kd_match = jax.jit(lambda a, b: (per_token_kd(a), per_token_kd(b)))(
      jnp.asarray(r.normal(size=(B, T, V))), jnp.asarray(logits.reshape(B, T, V)))
  assert (np.asarray(kd_random) > 0).all()
  assert np.abs(np.asarray(kd_match)).max() < 1e-12


def test_cross_entropy_is_kd_against_one_hot_teacher():
  x = make_inputs(8)
  scfg = student_cfg()
  # Dense one-hot teacher: identity embedding, no soft-cap, logit 1e4 on the target (exp(-1e4) = 0).
  tcfg = tiny(vocab_size=V, num_real_tokens=N_REAL, d_model=V, final_softcap=None)
  with jax.enable_x64(True):
    H, E, y, w = (jnp.asarray(x[k]) for k in ("H", "E", "y", "w"))

    def ce(H, E):
      return L.cross_entropy_sums(scfg, E, H, y, w, chunk_size=3)["nll"]

    def kd_sparse(H, E):  # sparse one-hot teacher through the public top-k path (k = 1, tail = 0)
      return L.topk_distill_sums(scfg, E, H, jnp.zeros((B, T, 1)), y[..., None], y, w,
                                 loss="forward_kl", chunk_size=3)["kd"]

    def kd_dense(H, E):
      return L.distill_sums(scfg, E, H, tcfg, jnp.eye(V), 1e4 * jax.nn.one_hot(y, V), y, w,
                            loss="soft_ce", chunk_size=3)["kd"]

    (ref, ref_g), *others = jax.jit(lambda H, E: [jax.value_and_grad(f, argnums=(0, 1))(H, E)
                                                  for f in (ce, kd_sparse, kd_dense)])(H, E)
  z, _ = np_logits(x["E"], x["H"], CAP_S)
  n = np.arange(B * T)
  assert_close(ref, -(x["w"].reshape(-1) * np_log_softmax(z)[n, x["y"].reshape(-1)]).sum())
  for val, g in others:
    assert_close(val, ref)
    assert_close(g[0], ref_g[0])
    assert_close(g[1], ref_g[1])


def test_cross_entropy_keys_and_z_loss():
  x = make_inputs(9)
  out = L.cross_entropy_sums(student_cfg(), jnp.asarray(x["E"], jnp.float32),
                             jnp.asarray(x["H"], jnp.float32), jnp.asarray(x["y"]),
                             jnp.asarray(x["w"], jnp.float32), chunk_size=4, z_loss=1e-4)
  assert set(out) == {"nll", "correct", "weight", "z_loss"}
  z, _ = np_logits(x["E"], x["H"], CAP_S)
  lse = np.log(np.exp(z).sum(-1))
  np.testing.assert_allclose(out["z_loss"], 1e-4 * (x["w"].reshape(-1) * lse**2).sum(), rtol=1e-5)


def test_vocab_mismatch_and_bad_args_raise():
  x = make_inputs()
  args = (jnp.asarray(x["E"]), jnp.asarray(x["H"]))
  tcfg = tiny(vocab_size=V + 2, d_model=D_T)
  with pytest.raises(ValueError, match=f"teacher vocab_size {V + 2} != student vocab_size {V}"):
    L.distill_sums(student_cfg(), *args, tcfg, jnp.zeros((V + 2, D_T)), jnp.asarray(x["Ht"]),
                   jnp.asarray(x["y"]), jnp.asarray(x["w"]))
  with pytest.raises(ValueError, match="unknown distillation loss"):
    L.distill_sums(student_cfg(), *args, teacher_cfg(), jnp.asarray(x["Et"]), jnp.asarray(x["Ht"]),
                   jnp.asarray(x["y"]), jnp.asarray(x["w"]), loss="kl")


def test_distill_config_and_schedule():
  cfg = DistillConfig(loss="jsd", beta=0.9, alpha=1.0, alpha_end=0.5, alpha_steps=100,
                        temperature=4.0, temperature_end=1.0, temperature_steps=200)
  sched = jax.jit(lambda s: distill_schedule(cfg, s))
  for step, alpha, temp in ((0, 1.0, 4.0), (50, 0.75, 3.25), (100, 0.5, 2.5), (300, 0.5, 1.0)):
    a, t = sched(jnp.int32(step))
    np.testing.assert_allclose([a, t], [alpha, temp], rtol=1e-6)
  assert distill_schedule(DistillConfig(alpha=0.3, temperature=2.0), 7) == (0.3, 2.0)
  for bad in (dict(loss="kl"), dict(beta=1.5), dict(alpha=-0.1), dict(temperature=0.0),
              dict(alpha_end=0.5), dict(temperature_steps=10), dict(alpha_end=2.0, alpha_steps=3)):
    with pytest.raises(ValueError):
      DistillConfig(**bad)


def _temp_bytes(loss_fn, T_len, V_big=32000, D=64, chunk=256):
  shapes = (jax.ShapeDtypeStruct((1, T_len, D), jnp.float32), jax.ShapeDtypeStruct((V_big, D), jnp.float32),
            jax.ShapeDtypeStruct((1, T_len, D), jnp.float32), jax.ShapeDtypeStruct((V_big, D), jnp.float32),
            jax.ShapeDtypeStruct((1, T_len), jnp.int32), jax.ShapeDtypeStruct((1, T_len), jnp.float32))
  cfg = tiny(vocab_size=V_big, d_model=D)
  grad = jax.grad(lambda h, e, ht, et, y, w: loss_fn(cfg, h, e, ht, et, y, w, chunk), argnums=(0, 1))
  return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_memory_flat_in_sequence_length():
  def ours(cfg, h, e, ht, et, y, w, chunk):
    return L.distill_sums(cfg, e, h, cfg, et, ht, y, w, loss="jsd", alpha=0.5, chunk_size=chunk)["loss"]

  def naive(cfg, h, e, ht, et, y, w, chunk):
    from gemma2_jax.model.transformer import logits_from_hidden
    logq = jax.nn.log_softmax(logits_from_hidden(cfg, e, h))
    logp = jax.lax.stop_gradient(jax.nn.log_softmax(logits_from_hidden(cfg, et, ht)))
    return jnp.sum(w * jnp.sum(jnp.exp(logp) * (logp - logq), -1))

  ours_growth = _temp_bytes(ours, 2048) / _temp_bytes(ours, 512)
  naive_growth = _temp_bytes(naive, 2048) / _temp_bytes(naive, 512)
  assert ours_growth < 1.5, ours_growth
  assert naive_growth > 3.0, naive_growth

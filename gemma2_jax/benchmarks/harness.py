"""The `gemma2_jax` model of lm-evaluation-harness (PyPI `lm-eval` 0.4.x): importing this module
registers it.

    lm_eval's CLI:  python -m gemma2_jax.benchmarks --model gemma2_jax \\
                      --model_args checkpoint=CKPT,dtype=float32 --tasks hellaswag
    Python:         lm_eval.simple_evaluate(model=Gemma2JaxLM(checkpoint=CKPT), tasks=[...])
    in memory:      Gemma2JaxLM.from_params(cfg, params, tokenizer, mesh=mesh)  (e.g. during training)

It follows the `hf` backend (lm_eval.models.huggingface.HFLM) on a Gemma tokenizer request by request:

* tokens: `tok_encode` adds `<bos>` (as Gemma's HF tokenizer does; `add_bos_token=False` turns it off)
  unless the text already starts with the `<bos>` piece; control pieces written in the text (`<bos>`,
  `<eos>`, `<pad>`) are those tokens, as HF's tokenizer reads them. A (context, continuation) pair is
  split as TemplateLM does: the whole text encoded, the context's tokens cut off the front
  (trailing spaces of the context moved to the continuation); an empty context is `<bos>`.
* loglikelihood: the input is (context + continuation)[-(max_length + 1):][:-1] (left truncation);
  the continuation's log-probs are summed from an fp32 log-softmax; `is_greedy` is the argmax (first
  maximum, over the whole vocabulary) equal to every continuation token.
* loglikelihood_rolling: lm_eval's disjoint rolling windows of max_length over tok_encode(text) (so
  `<bos>` + the text's tokens), the first window conditioned on the prefix token `<bos>` (the first
  token scored is the text's own `<bos>`, exactly as HFLM scores it).
* generate_until: contexts left-truncated to max_length - max_gen_toks, greedy unless the request
  samples, up to max_gen_toks new tokens, stopping at `<eos>`; the text is the decode (control
  tokens dropped) cut at the first stop string. The KV cache is the compute dtype's (float32 when
  run in float32: a bf16 cache flips near-tied greedy picks).

Requests run on the mesh of all the job's devices (`mesh=` as `sample --mesh`), in batches of
`batch_size` rows (rounded up to whole rows per batch shard on each data group of processes, as
`sample` does) sorted longest first and padded to power-of-two length buckets: one compile per
bucket. Scoring right-pads its rows (causal, so padding changes nothing before it), generation
left-pads them (the sampler).

Several processes (`--distributed`): a jitted SPMD program must be called by every process with the
same shapes, so every process builds every request (lm_eval sees one rank, `world_size` 1, on each)
and runs every batch; each process feeds only its data group's rows of a batch to its devices
(`generation.Layout`, `sharding.host_to_global`) and the scores are gathered back to all. A check
first that every process holds the same requests (else one error everywhere, not a hang). The results
are then the same on every process; `python -m gemma2_jax.benchmarks` sets lm_eval's `LOCAL_RANK`
on processes other than 0 (its tensor-parallel convention), so that only process 0 returns them and
writes the results file. The figures equal a one-process run on the same mesh and batch size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gemma2_jax.data.chat import END_OF_TURN, generation_prefix, normalize, turn
from gemma2_jax.data.tokenizer import PAD_ID, Tokenizer
from gemma2_jax.errors import UserError
from gemma2_jax.inference.generation import Layout, dtype_for
from gemma2_jax.inference.sampler import Sampler, SamplingConfig, bucket_length
from gemma2_jax.model.transformer import forward_hidden, logits_from_hidden

DEFAULT_MAX_LENGTH = 8192  # Gemma 2's context (HFLM reads max_position_embeddings: 8192)
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's
DEFAULT_BATCH_SIZE = 16
SCORE_CHUNK = 256  # positions per vocabulary projection while scoring: [B, 256, V] fp32 at a time
GEN_CHUNK = 32  # tokens decoded per call before the stop strings are checked on the host


class HarnessError(UserError):
  """A bad argument of the gemma2_jax lm-eval model."""


@functools.partial(jax.jit, static_argnums=(0, 4))
def score_tokens(cfg, params, inputs_BT, targets_BT, chunk: int):
  """(log p(target) [B, T] fp32, target == argmax [B, T]) at every position of right-padded rows.

  The logits are made `chunk` positions at a time (the whole [B, T, V] would not fit for a 256k
  vocabulary), with the same tied projection and soft-cap as the training forward pass.
  """
  hidden_BTD = forward_hidden(cfg, params, inputs_BT)
  B, T, D = hidden_BTD.shape
  embedding_VD = params["embedder"]["input_embedding"]
  hidden_nBCD = hidden_BTD.reshape(B, T // chunk, chunk, D).swapaxes(0, 1)
  targets_nBC = targets_BT.reshape(B, T // chunk, chunk).swapaxes(0, 1)

  def one(xs):
    hidden_BCD, targets_BC = xs
    logits_BCV = logits_from_hidden(cfg, embedding_VD, hidden_BCD).astype(jnp.float32)
    logprobs_BCV = jax.nn.log_softmax(logits_BCV, axis=-1)
    logprob_BC = jnp.take_along_axis(logprobs_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return logprob_BC, jnp.argmax(logits_BCV, axis=-1) == targets_BC

  logprob_nBC, greedy_nBC = jax.lax.map(one, (hidden_nBCD, targets_nBC))
  return logprob_nBC.swapaxes(0, 1).reshape(B, T), greedy_nBC.swapaxes(0, 1).reshape(B, T)


def _int_or_default(value, default: int, name: str) -> int:
  if value is None or str(value).startswith("auto"):
    return default
  try:
    return int(value)
  except ValueError:
    raise HarnessError(f"{name} must be an integer, got {value!r}") from None


def _bool(value) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes")
  return bool(value)


@register_model("gemma2_jax")
class Gemma2JaxLM(TemplateLM):
  """lm-eval model over a gemma2_jax checkpoint (any format `checkpoint.read_config` reads: HF,
  Kaggle, native, a training workdir) or, through `from_params`, an in-memory parameter tree.

  model_args: checkpoint, tokenizer (default: `prompts.default_tokenizer(checkpoint)`), dtype
  (auto/float32/bfloat16; auto = float32 on CPU), cache_dtype (default: dtype), mesh (`sample
  --mesh`), batch_size, max_length, max_gen_toks, add_bos_token, seed (sampling keys), progress
  (progress bars, process 0's alone).
  """

  def __init__(self, checkpoint: str | None = None, *, tokenizer=None, dtype: str = "auto",
               cache_dtype: str | None = None, mesh: str | object = "", batch_size=DEFAULT_BATCH_SIZE,
               max_length=None, max_gen_toks=None, add_bos_token=True, seed=0, progress=True,
               sampler: Sampler | None = None, **unused):
    super().__init__()
    if sampler is None:
      if not checkpoint:
        raise HarnessError("the gemma2_jax model needs checkpoint=PATH (or Gemma2JaxLM.from_params)")
      sampler, tokenizer = self._load(str(checkpoint), tokenizer, dtype, mesh)
    elif tokenizer is None:
      raise HarnessError("from_params needs the model's tokenizer")
    if not isinstance(tokenizer, Tokenizer):
      tokenizer = Tokenizer(tokenizer)
    tokenizer.check(sampler.cfg.vocab_size)
    self.sampler, self.tok = sampler, tokenizer
    self.cfg, self.params, self.mesh = sampler.cfg, sampler.params, sampler.mesh
    self.cache_dtype = dtype_for(cache_dtype, "cache_dtype") if cache_dtype else self.cfg.dtype
    # One batch's rows as the processes feed them (one process: batch_size rounded up to the shards).
    self.layout = Layout(sampler, _int_or_default(batch_size, DEFAULT_BATCH_SIZE, "batch_size"))
    self._batch_size = self.layout.size
    self._max_length = _int_or_default(max_length, DEFAULT_MAX_LENGTH, "max_length")
    self._max_gen_toks = _int_or_default(max_gen_toks, DEFAULT_MAX_GEN_TOKS, "max_gen_toks")
    self.add_bos_token = _bool(add_bos_token)
    self.seed = int(seed)
    self.progress = _bool(progress)
    sp = tokenizer.sp
    # The pieces HF's tokenizer reads as special tokens when written in the text.
    self._special = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())
                     if sp.IsControl(i) or sp.IsUnknown(i)}
    self._special_re = re.compile("|".join(map(re.escape, sorted(self._special, key=len,
                                                                  reverse=True))))
    self._bos_text = sp.IdToPiece(sp.bos_id())

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Gemma2JaxLM:
    """lm_eval's construction from --model_args and its own flags (batch_size, device, ...): a key
    in both is the model_args' (lm_eval passes --batch_size's default 1 even when not given)."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                             ) -> Gemma2JaxLM:
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def from_params(cls, cfg, params, tokenizer, *, mesh=None, rules=None, dtype: str | None = None,
                  **options) -> Gemma2JaxLM:
    """The model around an in-memory parameter tree (`Transformer.params()`, or a train state's
    params laid out on `mesh` by the sharding `rules`); `tokenizer` a Tokenizer or a path."""
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return cls(sampler=Sampler(cfg, params, mesh=mesh, rules=rules), tokenizer=tokenizer, **options)

  @staticmethod
  def _load(path: str, tokenizer, dtype: str, mesh_spec):
    from gemma2_jax import checkpoint
    from gemma2_jax.inference.generation import load_sampler, make_sampler_mesh
    from gemma2_jax.inference.prompts import default_tokenizer

    cfg = checkpoint.read_config(path)
    tokenizer = Tokenizer(tokenizer or default_tokenizer(path))
    tokenizer.check(cfg.vocab_size)
    mesh = mesh_spec if not isinstance(mesh_spec, str) else make_sampler_mesh(mesh_spec, cfg)
    return load_sampler(path, dtype_for(dtype), cfg, mesh), tokenizer

  # --- lm_eval's model interface ---------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tok.sp.eos_id()

  @property
  def prefix_token_id(self) -> int:
    return self.tok.sp.bos_id()

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return f"gemma2_jax-{self.tok.sha256[:16]}"

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if not chat_template:
      return None
    return "gemma2_jax.data.chat (Gemma: <start_of_turn>{role}\\n{text}<end_of_turn>\\n)"

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """`<bos>` + Gemma's turns (`gemma2_jax.data.chat`, what chat training sees; a system message
    joins the first user turn) + `<start_of_turn>model\\n`; without `add_generation_prompt` the last
    (model) turn is left open, to be continued."""
    turns = normalize(chat_history)
    text = self._bos_text + "".join(turn(role, t) for role, t in turns)
    if add_generation_prompt:
      return text + generation_prefix()
    if turns and turns[-1][0] == "model":
      text = text[:-len(END_OF_TURN + "\n")]
    return text

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    if add_special_tokens is None and string.startswith(self._bos_text):
      add = False
    ids = ([self.prefix_token_id] if add else []) + self._encode_text(string)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tok.decode(tokens)  # SentencePiece drops the control tokens

  def _encode_text(self, text: str) -> list[int]:
    ids, at = [], 0
    for m in self._special_re.finditer(text):
      ids += self.tok.encode(text[at:m.start()]) if m.start() > at else []
      ids.append(self._special[m.group()])
      at = m.end()
    return ids + (self.tok.encode(text[at:]) if at < len(text) else [])

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    rows = [(list(ctx) + list(cont), len(cont)) for _, ctx, cont in requests]
    out = self.score(rows, disable_tqdm=disable_tqdm)
    for (request, _, _), answer in zip(requests, out, strict=True):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    owner, rows = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      windows = lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length, context_len=1)
      for ctx, cont in map(lm_utils.make_disjoint_window, windows):
        owner.append(i)
        rows.append((ctx + cont, len(cont)))
    scores = self.score(rows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, scores, strict=True):
      totals[i] += logprob
    for r, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
    return totals

  def score(self, rows: Sequence[tuple[list[int], int]], *, disable_tqdm: bool = True
            ) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) of the last n tokens of each token list (n, list), each token
    predicted from the ones before it; a list longer than max_length + 1 loses its front."""
    seqs = []
    for tokens, n in rows:
      tokens = tokens[-(self.max_length + 1):]
      if n < 1 or len(tokens) < 2:
        raise HarnessError("a scored row needs a context token and a continuation token")
      seqs.append((tokens, min(n, len(tokens) - 1)))
    self._agree("score", ([*t, -n] for t, n in seqs))
    out = [None] * len(seqs)
    bar = tqdm(total=len(seqs), desc="gemma2_jax loglikelihood", disable=disable_tqdm or self._quiet())
    for batch in self._batches([len(t) - 1 for t, _ in seqs]):
      T = bucket_length(len(seqs[batch[0]][0]) - 1)
      inputs = np.full((self.batch_size, T), PAD_ID, np.int32)
      targets = np.full((self.batch_size, T), PAD_ID, np.int32)
      for r, i in enumerate(batch):
        tokens = seqs[i][0]
        inputs[r, :len(tokens) - 1] = tokens[:-1]
        targets[r, :len(tokens) - 1] = tokens[1:]
      logprob_BT, greedy_BT = self._score(inputs, targets)
      for r, i in enumerate(batch):
        (tokens, n), end = seqs[i], len(seqs[i][0]) - 1
        out[i] = (float(logprob_BT[r, end - n:end].astype(np.float64).sum()),
                  bool(greedy_BT[r, end - n:end].all()))
      bar.update(len(batch))
    bar.close()
    return out

  def _score(self, inputs_BT: np.ndarray, targets_BT: np.ndarray):
    """score_tokens of a whole batch (every process passes all of it, feeds its group's rows)."""
    from jax.experimental import multihost_utils

    from gemma2_jax.parallel.sharding import activation_sharding, host_to_global

    T = inputs_BT.shape[1]
    if self.mesh is None:
      return jax.device_get(score_tokens(self.cfg, self.params, inputs_BT, targets_BT,
                                         min(T, SCORE_CHUNK)))
    layout = self.layout
    mine = slice(layout.index * layout.local, (layout.index + 1) * layout.local)
    with activation_sharding(self.mesh, self.sampler.rules):
      placed = [host_to_global(x[mine], self.sampler.row_sharding) for x in (inputs_BT, targets_BT)]
      scored = score_tokens(self.cfg, self.params, *placed, min(T, SCORE_CHUNK))
    # Global row r is the batch's row layout.order[r] (one process: the identity).
    logprob_BT, greedy_BT = multihost_utils.process_allgather(scored, tiled=True)
    order = np.asarray(layout.order)
    out_logprob, out_greedy = np.empty_like(logprob_BT), np.empty_like(greedy_BT)
    out_logprob[order], out_greedy[order] = logprob_BT, greedy_BT
    return out_logprob, out_greedy

  def _quiet(self) -> bool:
    return not self.progress or jax.process_index() != 0

  def use_params(self, params):
    """Scores with `params` from now on (the same tree structure, shapes and shardings: e.g. a
    training run's params at a later step); the compiled programs are reused."""
    self.params = self.sampler.params = params

  def _agree(self, what: str, items):
    """Several processes: every one must hold the same requests (each reads the task data itself),
    or their programs would differ and wait on each other forever; a HarnessError on all of them.
    `items`: token lists or strings, hashed here, one digest exchanged."""
    if jax.process_count() == 1:
      return
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for item in items:
      h.update(item.encode() if isinstance(item, str) else np.asarray(item, np.int64).tobytes())
      h.update(b"\0")
    digest = h.digest()
    digests = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))
    other = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if other:
      raise HarnessError(f"process {other[0]} has other {what} requests than process 0: every "
                         "process must read the same tasks, data and arguments")

  def _batches(self, lengths: Sequence[int]):
    """Indices longest first, in batches of at most batch_size rows of one length bucket each."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch, bucket = [], None
    for i in order:
      b = bucket_length(lengths[i])
      if batch and (b != bucket or len(batch) == self.batch_size):
        yield batch
        batch = []
      batch.append(i)
      bucket = b
    if batch:
      yield batch

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    args = [r.args for r in requests]
    groups: dict[str, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(args):
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
    self._agree("generate_until", (json.dumps(a, sort_keys=True, default=str) for a in args))
    out = [None] * len(args)
    bar = tqdm(total=len(args), desc="gemma2_jax generate_until", disable=disable_tqdm or self._quiet())
    for idxs in groups.values():
      kwargs = normalize_gen_kwargs(dict(args[idxs[0]][1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.sp.IdToPiece(
        self.eot_token_id))
      max_gen = kwargs.pop("max_gen_toks")
      if max_gen >= self.max_length:
        raise HarnessError(f"max_gen_toks {max_gen} must be less than max_length {self.max_length}")
      greedy = not kwargs.get("do_sample") or not kwargs.get("temperature")
      sampling = SamplingConfig(
        max_new_tokens=max_gen, temperature=0.0 if greedy else float(kwargs["temperature"]),
        top_k=kwargs.get("top_k") or None, top_p=kwargs.get("top_p"),
        stop_tokens=(self.eot_token_id,), cache_dtype=self.cache_dtype)
      encoded = {i: self.tok_encode(args[i][0], left_truncate_len=self.max_length - max_gen)
                 for i in idxs}
      for batch in self._batches([len(encoded[i]) for i in idxs]):
        texts = self._generate([idxs[j] for j in batch], encoded, sampling, until)
        for j, text in zip(batch, texts, strict=True):
          out[idxs[j]] = text
          self.cache_hook.add_partial("generate_until", args[idxs[j]], text)
        bar.update(len(batch))
    bar.close()
    return out

  def _generate(self, rows: list[int], encoded: dict[int, list[int]], sampling: SamplingConfig,
                until: list[str]) -> list[str]:
    """One batch, the requests `rows` (their indices seed their keys): decoded GEN_CHUNK tokens at a
    time until every row stopped (a stop token, or a stop string in its text) or reached
    max_new_tokens; the texts cut at their first stop string. Every process decides alike, from
    the gathered tokens."""
    state = self.layout.start(self.sampler, rows, encoded, sampling, self.seed)
    n = 0
    while True:
      n = min(n + GEN_CHUNK, sampling.max_new_tokens)
      state = self.sampler.continue_(state, sampling, until=n)
      done = self.layout.results(state, len(rows))
      texts = [self.tok_decode(r.tokens) for r in done]
      if n == sampling.max_new_tokens or all(
          len(r.tokens) < n or (r.tokens and r.tokens[-1] in sampling.stop_tokens)
          or any(s and s in t for s in until) for r, t in zip(done, texts, strict=True)):
        break
    return [postprocess_generated_text(t, until, None) for t in texts]

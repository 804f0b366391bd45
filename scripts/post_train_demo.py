"""Gemma 2's post-training recipe on CPU: SFT the quickstart's tiny teacher on Korean instructions,
then distill a tiny student from it off-policy and on-policy, and compare the two students.

  .venv/bin/python scripts/post_train_demo.py [--runs runs]
  .venv/bin/python scripts/post_train_demo.py --write_data   # regenerate tests/data/ko_instruct*.jsonl

Stages, each in its own workdir under --runs (re-running resumes; a finished run just re-evaluates):

  pretrain_tiny  the teacher pre-trained on the Korean sample (configs/pretrain_tiny.py) and
  distill_tiny   a student pre-trained by distillation from it (configs/distill_tiny.py): both are
                 what scripts/quickstart.sh trains, run here with `python -m gemma2_jax.train` only
                 when their HF exports are missing
  sft_tiny       the teacher fine-tuned from its export (init_from) on tests/data/ko_instruct.jsonl,
                 a chat source: CE on the responses only (`sft_config`)
  kd_tiny        the student, from its export, distilled online from the SFT teacher on the
                 dataset's responses: off-policy KD (`student_config`, onpolicy_lambda = 0)
  gkd_tiny       the same student, data, loss and steps, on-policy (onpolicy_lambda = 1): at every
                 step the student answers the batch's prompts itself, inside the jitted step, and
                 learns the teacher's distribution on its own samples (GKD, Agarwal et al. 2024)

Both students minimize the reverse KL KL(student || teacher) on the response tokens, one
conversation per row (chat=True, pack=False), so the runs differ only in whose responses they are.
The configs are built here from gemma2_jax.experiment's `base_config` / `distill_config` and trained
in this process (gemma2_jax.trainer.Trainer, as `python -m gemma2_jax.train` does).

Then it prints greedy answers of the SFT teacher and the students to a few held-out prompts
(tests/data/ko_instruct_eval.jsonl; `gemma2_jax.generate`), and each student's mean per-token reverse
KL to the SFT teacher on its own samples of all held-out prompts (temperature 1, as in training;
`gemma2_jax.onpolicy.reverse_kl_on_samples`), the quantity on-policy distillation minimizes. The last
line is

  reverse KL to the teacher on own samples: on-policy A, off-policy B

About three minutes on 2 CPU cores, the quickstart's two runs included when they are not there.

The instruction set (`build_instructions`) is cut from the shipped sample: the articles of the
Constitution and the explanation sections of the bills, split into sentences; a prompt is a heading
(`헌법 제N조`, the bill's title), alone or followed by a sentence or its start, the response what
follows in the same article or section. Whole articles / sections are held out for evaluation (every
tenth): see tests/data/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TOKENIZER = DATA / "ko_sp1024_chat.model"
TRAIN_FILE, EVAL_FILE = DATA / "ko_instruct.jsonl", DATA / "ko_instruct_eval.jsonl"

# Token budgets (tokens of the 1024-piece chat tokenizer, Gemma's chat template included): a whole
# conversation fits a 128-token row, and a prompt leaves RESPONSE_MAX_TOKENS + 1 slots for the
# student's on-policy sample in a row of SEQ_LEN (T + 1 - N >= the prompt).
SEQ_LEN = 128
PROMPT_MAX_TOKENS = 64  # <bos> ... <start_of_turn>model\n
RESPONSE_MAX_TOKENS = 63  # the response text (its <end_of_turn> is one more)
EVAL_EVERY = 10  # every tenth article / section is held out


# ---------------------------------------------------------------------------------------------------
# The instruction set


def _sentences(text: str) -> list[str]:
  """A paragraph -> sentences: split after two Hangul syllables and a full stop ('...한다. 다만, ...';
  not after an item marker such as '가.'). A clause number takes no space after it ('①대한민국은')."""
  text = re.sub(r"([①-⑳])\s+", r"\1", " ".join(text.split()))
  return [s for s in re.split(r"(?<=[가-힣]{2}\.)\s+", text) if s]


def _constitution_units(text: str) -> list[tuple[str, list[str]]]:
  """(heading, sentences) per article: `헌법 제N조` (`헌법 부칙 제N조` in the addenda); each clause
  (①, ②, ...) and numbered item starts a new sentence; the preamble and chapter titles are left out."""
  units: list[tuple[str, list[str]]] = []
  addenda = False
  for line in text.splitlines():
    line = line.strip()
    if "부칙" in line and not line.startswith("제"):
      addenda = True
      continue
    m = re.match(r"제(\d+)조(?:의\d+)?\s+(.*)", line)
    if m and not re.match(r"제\d+[장절]", line):
      heading = f"헌법 {'부칙 ' if addenda else ''}제{m.group(1)}조"
      units.append((heading, []))
      line = m.group(2)
    elif not units or not line or re.match(r"제\d+[장절]\s", line):
      continue
    units[-1][1].extend(_sentences(line))
  return units


def _bill_units(text: str) -> list[tuple[str, list[str]]]:
  """(the bill's title, sentences) per section of its explanation (제안이유 / 주요내용): the lines
  are hard-wrapped (often mid-word), so they are joined as they are; a line that starts indented
  starts a paragraph. Page markers (`- 1 -`) are skipped; the section ends at the bill's text, its
  notes or the comparison table."""
  lines = text.splitlines()
  title = " ".join(lines[0].split())
  for line in lines[1:]:  # a title wrapped over two lines ends at the next line that ends it
    if title.endswith("안"):
      break
    title = f"{title} {line.strip()}".strip()
  units: list[tuple[str, list[str]]] = []
  paragraphs: list[str] | None = None

  def close():
    if paragraphs:
      units.append((title, [s for p in paragraphs for s in _sentences(p)]))

  for line in lines[1:]:
    bare = line.strip()
    if bare.startswith(("제안이유", "주요내용")):
      close()
      paragraphs = []
      continue
    if paragraphs is None or not bare or re.fullmatch(r"-\s*\d+\s*-", bare):
      continue
    if bare.startswith(("참고사항", "법률", "신 ·구조문", "부      칙")) or set(bare) <= {"-", "."}:
      close()
      paragraphs = None
      continue
    # An indented line starts a paragraph unless the one before stops mid-sentence (an item's
    # indented continuation); a wrapped line's trailing space is kept (a cut between words).
    if not paragraphs or (line[:1].isspace() and paragraphs[-1].rstrip()[-1:] in (".", ",")):
      paragraphs.append(line.lstrip())
    else:
      paragraphs[-1] += line
  close()
  return units


def build_instructions(data_dir: Path = DATA, tokenizer: Path = TOKENIZER
                       ) -> tuple[list[dict], list[dict]]:
  """(train, eval) instruction examples ({"prompt", "response"}) from the Korean sample; deterministic.

  Units are the Constitution's articles, then the bills' explanation sections (files in name order).
  In a unit of sentences s_1 .. s_n, with its heading h (`헌법 제N조` or the bill's title):
    - prompt = h, response = s_1, plus s_2 when that still fits (a prompt seen before is skipped:
      a bill's second section, a bill of the same title);
    - for each i < n: prompt = h + s_i, response = s_{i+1}, plus s_{i+2} when that still fits;
    - for each comma in a sentence: prompt = h + the sentence up to the comma, response = the rest
      of the sentence (both at least two words).
  Examples whose prompt (with the chat template: <bos> up to `<start_of_turn>model\\n`) is over
  PROMPT_MAX_TOKENS or whose response is over RESPONSE_MAX_TOKENS are left out. Every
  EVAL_EVERY-th unit (the last of each run of ten) goes whole to eval.
  """
  from gemma2_jax.data.chat import conversation, encode
  from gemma2_jax.data.tokenizer import Tokenizer

  tok = Tokenizer(tokenizer)
  units = _constitution_units((data_dir / "ko" / "constitution.txt").read_text(encoding="utf-8"))
  for path in sorted((data_dir / "ko").glob("18098*.txt")):
    units += _bill_units(path.read_text(encoding="utf-8"))

  def fits(response: str) -> bool:
    return len(tok.encode(response)) <= RESPONSE_MAX_TOKENS

  def candidates(heading: str, sentences: list[str]):
    yield heading, " ".join(sentences[:2]) if fits(" ".join(sentences[:2])) else sentences[0]
    for i in range(len(sentences) - 1):
      response = sentences[i + 1]
      if i + 2 < len(sentences) and fits(f"{response} {sentences[i + 2]}"):
        response = f"{response} {sentences[i + 2]}"
      yield f"{heading} {sentences[i]}", response
    for sentence in sentences:
      for m in re.finditer(r", ", sentence):
        head, rest = sentence[:m.end() - 1], sentence[m.end():]
        if len(head.split()) >= 2 and len(rest.split()) >= 2 and fits(rest):
          yield f"{heading} {head}", rest

  train, held_out, seen = [], [], set()
  for k, (heading, sentences) in enumerate(units):
    out = held_out if k % EVAL_EVERY == EVAL_EVERY - 1 else train
    for prompt, response in candidates(heading, sentences):
      if prompt in seen or not fits(response):
        continue
      seen.add(prompt)
      example = {"prompt": prompt, "response": response}
      (ids, weights, _), = encode([conversation(example)], tok, bos=True)
      prompt_len = int(weights.argmax())  # tokens before the first response token
      if prompt_len <= PROMPT_MAX_TOKENS:
        assert len(ids) <= SEQ_LEN, (example, len(ids))
        out.append(example)
  return train, held_out


def write_instructions(train_file: Path = TRAIN_FILE, eval_file: Path = EVAL_FILE) -> None:
  train, held_out = build_instructions()
  for path, rows in ((train_file, train), (eval_file, held_out)):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({len(rows)} examples)")


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------------------------------------------
# The runs

SFT_STEPS, DISTILL_STEPS = 150, 150
MAX_NEW_TOKENS = RESPONSE_MAX_TOKENS + 1  # the student's samples: a response and its <end_of_turn>
SHOW = 3  # held-out prompts whose greedy answers are printed
KL_SEEDS = 4  # samples per held-out prompt for the reverse KL


def _load_config(name: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _chat_data(c, *, pack: bool):
  """The instruction set as the run's data: train on ko_instruct.jsonl, eval on the held-out file."""
  c.data.tokenizer = str(TOKENIZER)
  c.data.train.paths = str(TRAIN_FILE)
  c.data.train.format = "jsonl"
  c.data.train.chat = True
  c.data.train.pack = pack
  c.data.eval = dict(c.data.train)
  c.data.eval.paths = str(EVAL_FILE)


def sft_config(init_from: Path):
  """The pretrain_tiny teacher fine-tuned on the instructions (CE on the responses)."""
  from gemma2_jax.model.config import ModelConfig
  from gemma2_jax.training.experiment import base_config

  model = ModelConfig(**_load_config("pretrain_tiny").model.to_dict())
  c = base_config(model, steps=SFT_STEPS, global_batch=8, seq_len=SEQ_LEN, log_every=25,
                  eval_every=50, eval_batches=4, loss_chunk=64)
  c.init_from = str(init_from)
  c.optimizer.learning_rate = 1e-3
  c.optimizer.end_learning_rate = 1e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.01
  _chat_data(c, pack=True)
  return c


def student_config(teacher: Path, init_from: Path, onpolicy_lambda: float):
  """configs/onpolicy_distill_tiny.py (the distill_tiny student, reverse KL on the responses, one
  conversation per row) distilled from the SFT teacher on the dataset's responses (lambda 0) or its
  own samples (lambda 1), with the held-out eval."""
  c = _load_config("onpolicy_distill_tiny")
  c.teacher.checkpoint = str(teacher)
  c.init_from = str(init_from)
  c.train.update(steps=DISTILL_STEPS, log_every=25, eval_every=50, eval_batches=4)
  c.distill.onpolicy_lambda = onpolicy_lambda
  c.distill.onpolicy_max_new_tokens = MAX_NEW_TOKENS
  _chat_data(c, pack=False)
  return c


def train_cli(config: str, workdir: Path, *overrides: str):
  cmd = [sys.executable, "-m", "gemma2_jax.train", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  print("$", " ".join(cmd[1:]), flush=True)
  rc = subprocess.run(cmd, cwd=ROOT).returncode
  if rc:
    raise SystemExit(rc)  # the run's own `error: ...` line is the last one printed


def train(name: str, config, workdir: Path) -> Path:
  """Runs one stage in this process (re-running resumes; a finished run just re-evaluates); returns
  its HF export."""
  import jax

  from gemma2_jax.training.experiment import from_config
  from gemma2_jax.training.loop import Trainer

  print(f"\n{name}: workdir={workdir}", flush=True)
  exp = from_config(config, num_devices=jax.device_count())
  summary = Trainer(exp, str(workdir)).run()
  keys = ("loss", "kd", "eval_loss", "eval_perplexity", "onpolicy_fraction", "gen_length_mean")
  print(f"done: {exp.train.steps} steps; "
        + " ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary), flush=True)
  return workdir / f"hf_step{exp.train.steps}"


def check_tokenizer(workdir: Path):
  """A quickstart workdir from before its teacher used the chat tokenizer would be trained and
  sampled with the wrong ids: refuse it."""
  config = workdir / "config.json"
  if config.is_file():
    used = Path(json.loads(config.read_text())["tokenizer"]).name
    if used != TOKENIZER.name:
      raise SystemExit(f"error: {workdir} was trained with {used}, not {TOKENIZER.name} (a run from "
                       f"before configs/pretrain_tiny.py switched tokenizers); move it aside or pass "
                       f"another --runs")


def reverse_kls(models: dict[str, Path], teacher: Path, prompts: list[str]) -> dict[str, float]:
  """Each model's mean per-token KL(model || teacher) on its own samples (temperature 1, as in
  training) of the prompts, averaged over KL_SEEDS seeds."""
  import numpy as np

  from gemma2_jax.checkpoint import load_params
  from gemma2_jax.data.tokenizer import Tokenizer
  from gemma2_jax.distill import onpolicy
  from gemma2_jax.inference.sampler import SamplingConfig, encode_prompt

  tok = Tokenizer(TOKENIZER)
  ids = [encode_prompt(tok, p, chat=True) for p in prompts]
  sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0,
                            stop_tokens=onpolicy.stop_tokens_for(TOKENIZER), cache_dtype="float32")
  teacher_cfg, teacher_params = load_params(teacher, "float32")
  out = {}
  for name, path in models.items():
    cfg, params = load_params(path, "float32")
    out[name] = float(np.mean([
      onpolicy.reverse_kl_on_samples(cfg, params, teacher_cfg, teacher_params, ids, sampling, seed)
      for seed in range(KL_SEEDS)]))
  return out


def answers(models: dict[str, Path], examples: list[dict]):
  import logging

  from gemma2_jax import generate, load_model

  logging.getLogger("absl").setLevel(logging.ERROR)
  prompts = [e["prompt"] for e in examples]
  texts = {name: generate(load_model(path), str(TOKENIZER), prompts, max_new_tokens=MAX_NEW_TOKENS,
                          chat=True)
           for name, path in models.items()}
  for i, e in enumerate(examples):
    print(f"\nprompt {i + 1}: {e['prompt']!r}")
    print(f"  {'reference':>19}: {e['response']!r}")
    for name in models:
      print(f"  {name:>19}: {texts[name][i]!r}")


def main():
  from gemma2_jax.checkpoint import CheckpointError
  from gemma2_jax.data import DataError
  from gemma2_jax.training.experiment import ConfigError

  try:
    run()
  except (ConfigError, DataError, CheckpointError, OSError) as e:
    raise SystemExit(f"error: {e}") from None


def run():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default="runs", help="parent directory of the workdirs")
  p.add_argument("--write_data", action="store_true",
                 help="regenerate tests/data/ko_instruct.jsonl and ko_instruct_eval.jsonl and exit")
  a = p.parse_args()
  if a.write_data:
    write_instructions()
    return
  start = time.time()
  runs = (ROOT / a.runs).resolve()
  pretrain, student0 = runs / "pretrain_tiny", runs / "distill_tiny"
  check_tokenizer(pretrain)
  check_tokenizer(student0)
  if not (pretrain / "hf_step200").is_dir():
    train_cli("configs/pretrain_tiny.py", pretrain)
  if not (student0 / "hf_step150").is_dir():  # the pre-trained student both runs start from
    train_cli("configs/distill_tiny.py", student0,
              f"--config.teacher.checkpoint={pretrain / 'hf_step200'}")
  teacher = train("SFT teacher (CE on the responses)", sft_config(pretrain / "hf_step200"),
                  runs / "sft_tiny")
  students = {}
  for name, workdir, lam in (("off-policy student", runs / "kd_tiny", 0.0),
                             ("on-policy student", runs / "gkd_tiny", 1.0)):
    students[name] = train(f"{name} (reverse KL, onpolicy_lambda={lam:g})",
                           student_config(teacher, student0 / "hf_step150", lam), workdir)

  held_out = read_jsonl(EVAL_FILE)
  shown = {}  # the first held-out prompt that is a whole sentence, of SHOW different articles
  for e in held_out:
    if e["prompt"].endswith("."):
      shown.setdefault(" ".join(e["prompt"].split()[:2]), e)
  answers({"SFT teacher": teacher, **students, "pre-trained student": student0 / "hf_step150"},
          list(shown.values())[:SHOW])
  kl = reverse_kls({"pre-trained student": student0 / "hf_step150", **students}, teacher,
                   [e["prompt"] for e in held_out])
  print(f"\nreverse KL(student || SFT teacher) per token on the student's own samples of the "
        f"{len(held_out)} held-out prompts (temperature 1, {KL_SEEDS} samples each):")
  for name, value in kl.items():
    print(f"  {name:>19}: {value:.4f}")
  print(f"wall time {time.time() - start:.0f} s")
  print(f"reverse KL to the teacher on own samples: on-policy {kl['on-policy student']:.4f}, "
        f"off-policy {kl['off-policy student']:.4f}")


if __name__ == "__main__":
  main()

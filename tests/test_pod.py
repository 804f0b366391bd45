"""scripts/pod.sh (TPU pod launcher over gcloud) and scripts/sbatch_gpu.sh, run as a user would, against a
fake `gcloud` on PATH: it records its argv (one JSON line per call), answers `queued-resources describe`
from a list of states, and plays the TPU VM's workers locally: `tpu-vm ssh --worker=W --command=S` runs
S with bash in a home directory per worker (HOME=worker-I, POD_WORKER_ID=I), `tpu-vm scp` copies into
those homes, `storage cp` copies to and from a local folder standing for the bucket. So each verb's
gcloud commands are checked exactly, and the scripts it runs on the workers really run: the detached
job, its log and bucket copies, SIGTERM on stop (then SIGKILL), the refusal of a second job, resume.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POD = ROOT / "scripts" / "pod.sh"
SBATCH = ROOT / "scripts" / "sbatch_gpu.sh"
WORKERS = 2
LOC = ["--name=tpu1", "--zone=us-east5-a", "--project=proj"]
G_LOC = ["--zone=us-east5-a", "--project=proj"]

FAKE_GCLOUD = r'''#!PYTHON
import glob, json, os, shutil, subprocess, sys

argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
root = os.environ["FAKE_ROOT"]

def flag(name):
    return next((a.split("=", 1)[1] for a in argv if a.startswith(name + "=")), None)

def workers():
    w = flag("--worker")
    return range(int(os.environ["FAKE_WORKERS"])) if w == "all" else [int(i) for i in w.split(",")]

def home(i):
    return os.path.join(root, f"worker-{i}")

def local(path):
    return os.path.join(root, "bucket", path[len("gs://"):]) if path.startswith("gs://") else path

if argv[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = os.path.join(root, "states")
    lines = open(states).read().split()
    print(lines[0])
    if len(lines) > 1:
        open(states, "w").write("\n".join(lines[1:]))
elif argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    script = flag("--command")
    procs = []
    for i in workers():
        os.makedirs(home(i), exist_ok=True)
        env = dict(os.environ, HOME=home(i), POD_WORKER_ID=str(i))
        procs.append(subprocess.Popen(["bash", "-c", script], cwd=home(i), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rc = 0
    for p in procs:
        out, err = p.communicate()
        sys.stdout.write(out)
        sys.stderr.write(err)
        rc = rc or p.returncode
    sys.exit(rc)
elif argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    src, dst = argv[4], argv[5].split(":", 1)[1]
    for i in workers():
        os.makedirs(home(i), exist_ok=True)
        shutil.copy(src, os.path.join(home(i), dst))
elif argv[:2] == ["storage", "cp"]:
    args = [a for a in argv[2:] if not a.startswith("-")]
    src, dst = local(args[0]), local(args[1])
    files = glob.glob(src) if "*" in src else [src]
    if not files:
        sys.exit("ERROR: no match for " + args[0])
    for f in files:
        os.makedirs(dst if dst.endswith("/") else os.path.dirname(dst), exist_ok=True)
        shutil.copy(f, dst)
'''

# `uv` on the workers: `uv venv` makes a venv whose python is this interpreter; `uv pip` is recorded.
FAKE_UV = r'''#!/bin/bash
echo "$*" >> "$FAKE_ROOT/uv.log"
if [ "$1" = venv ]; then
  d=$(pwd)/${@: -1}
  mkdir -p "$d/bin"
  printf '#!/bin/sh\nexec PYTHON "$@"\n' > "$d/bin/python"
  chmod +x "$d/bin/python"
  printf 'export PATH="%s/bin:$PATH"\n' "$d" > "$d/bin/activate"
fi
'''

# The job: prints steps until SIGTERM, then "saves" and exits 0 (or ignores SIGTERM with --stubborn).
FAKE_TRAIN = r'''
import json, os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if "--stubborn" in sys.argv else lambda *a: stop.append(1))
print("argv", json.dumps(sys.argv[1:]), "cwd", os.getcwd(), flush=True)
step = 0
while not stop:
    step += 1
    print(f"step {step}", flush=True)
    time.sleep(0.05)
print(f"stopped: preempted at step {step}", flush=True)
'''


def write_exe(path: Path, text: str):
  path.write_text(text.replace("PYTHON", sys.executable))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
  write_exe(bin_dir / "uv", FAKE_UV)
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  (tmp_path / "states").write_text("ACTIVE")
  log = tmp_path / "gcloud.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
             FAKE_ROOT=str(tmp_path), FAKE_WORKERS=str(WORKERS))
  env.pop("POD_WORKER_ID", None)

  class Fake:
    root = tmp_path

    def pod(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
      r = subprocess.run([str(POD), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
      if check:
        assert r.returncode == 0, r.stdout + r.stderr
      return r

    copies: list[list[str]] = []  # the workers' own gcloud calls: their log copies to the bucket

    def calls(self) -> list[list[str]]:
      """gcloud calls since the last look, but the workers' log copies (kept in `copies`)."""
      lines = log.read_text().splitlines() if log.exists() else []
      log.write_text("")
      calls = [json.loads(line) for line in lines]
      self.copies += [c for c in calls if c[:3] == ["storage", "cp", "--quiet"]]
      return [c for c in calls if c[:3] != ["storage", "cp", "--quiet"]]

    def worker_log(self, i: int) -> str:
      path = tmp_path / f"worker-{i}" / "gemma2_jax_run" / f"worker-{i}.log"
      return path.read_text() if path.exists() else ""

    def wait_for(self, text: str, timeout: float = 10.0):
      deadline = time.monotonic() + timeout
      while not all(text in self.worker_log(i) for i in range(WORKERS)):
        assert time.monotonic() < deadline, f"{text!r} not in every worker's log"
        time.sleep(0.05)

  yield Fake()
  for i in range(WORKERS):  # a job a failed test left running: its process group, by its id
    pid_file = tmp_path / f"worker-{i}" / "gemma2_jax_run" / "job.pid"
    if pid_file.exists():
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass


def ssh(workers: str, calls_command: str) -> list[str]:
  return ["compute", "tpus", "tpu-vm", "ssh", "tpu1", *G_LOC, f"--worker={workers}",
          f"--command={calls_command}"]


def printed_commands(stdout: str) -> list[list[str]]:
  """The printed `+ gcloud ...` commands (a quoted remote script spans lines), as the argv gcloud gets."""
  commands, text = [], None
  for line in stdout.splitlines():
    if text is None and not line.startswith("+ gcloud "):
      continue
    text = line[2:] if text is None else f"{text}\n{line}"
    try:
      commands.append(shlex.split(text)[1:])
      text = None
    except ValueError:  # an open quote: the command goes on
      pass
  assert text is None, text
  return commands


def split_command(call: list[str]) -> tuple[list[str], str]:
  """(the call without its remote script, the script)."""
  assert call[-1].startswith("--command=")
  return call[:-1], call[-1][len("--command="):]


def test_help_and_bad_input(fake):
  for args in (["--help"], ["help"], ["run", "--help"]):
    r = fake.pod(*args)
    assert "usage" in r.stdout
  bad = [
    (["launch", *LOC], "unknown verb 'launch'"),
    (["setup", "--zone=z"], "needs --name"),
    (["status", "--name=n"], "needs --zone"),
    (["run", *LOC], "run needs a command after --"),
    (["run", *LOC, "--"], "run needs a command after --"),
    (["exec", *LOC, "--", " "], "exec needs a command after --"),
    (["run", *LOC, "--", "python", "-m", "gemma2_jax.train", "--config=c.py"], "needs --distributed"),
    (["create", *LOC], "create needs --accelerator_type"),
    (["create", *LOC, "--accelerator_type=v5p-8", "--spot", "--reserved"], "exclude each other"),
    (["stop", *LOC, "--grace_s=soon"], "--grace_s must be a whole number"),
    (["stop", *LOC, "--worker=first"], "--worker is all, a worker index"),
    (["delete", *LOC, "--force"], "unknown flag --force for delete"),
    (["status", *LOC, "extra"], "unexpected argument 'extra'"),
    (["delete", *LOC, "--", "x"], "delete takes no command"),
    (["logs", "--from=/tmp/logs"], "--from is the bucket folder"),
    (["run", *LOC, "--log_dir=/tmp", "--", "true"], "--log_dir is a bucket folder"),
  ]
  for args, message in bad:
    r = fake.pod(*args, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert message in lines[0], (args, lines[0])
  assert fake.calls() == []


def test_create_waits_until_active(fake):
  (fake.root / "states").write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE")
  r = fake.pod("create", *LOC, "--accelerator_type=v5p-256", "--spot", "--poll_s=0",
               "--service_account=sa@proj.iam.gserviceaccount.com")
  create = ["compute", "tpus", "queued-resources", "create", "tpu1", "--node-id=tpu1", *G_LOC,
            "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5",
            "--scopes=https://www.googleapis.com/auth/cloud-platform", "--spot",
            "--service-account=sa@proj.iam.gserviceaccount.com"]
  describe = ["compute", "tpus", "queued-resources", "describe", "tpu1", *G_LOC,
              "--format=value(state.state)"]
  assert fake.calls() == [create, describe, describe, describe]
  assert "queued resource tpu1: ACTIVE" in r.stdout
  # what it prints is what it runs (the poll's command once)
  assert printed_commands(r.stderr) == [create, describe]

  (fake.root / "states").write_text("FAILED")
  r = fake.pod("create", *LOC, "--accelerator_type=v6e-64", "--reserved", "--poll_s=0", check=False)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("error: queued resource tpu1 is FAILED")
  assert fake.calls() == [
    [*create[:8], "--accelerator-type=v6e-64", "--runtime-version=v2-alpha-tpuv6e", create[10],
     "--reserved"], describe]
  (fake.root / "states").write_text("WAITING_FOR_RESOURCES")
  r = fake.pod("create", *LOC, "--accelerator_type=v5litepod-16", "--wait_s=1", "--poll_s=1", check=False)
  assert r.returncode == 1 and "still WAITING_FOR_RESOURCES after 1s" in r.stderr
  calls = fake.calls()
  assert calls[0] == [*create[:8], "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                      create[10]]
  assert calls[1:] == [describe, describe]  # at 0 s and at 1 s


def test_dry_run_prints_and_runs_nothing(fake):
  cmd = ["python", "-m", "gemma2_jax.train", "--config=configs/distill_9b.py",
         "--workdir=gs://bkt/runs/d9", "--config.data.train.paths=gs://bkt/corpus/*.jsonl", "--distributed"]
  verbs = [["create", "--accelerator_type=v5p-256"], ["setup"], ["setup", "--repo=https://x/y.git"],
           ["exec", "--", "nproc"], ["run", "--", *cmd], ["logs"], ["logs", "--from=gs://bkt/runs/d9/logs"],
           ["status"], ["stop"], ["delete"]]
  for verb in verbs:
    r = fake.pod(verb[0], *LOC, "--dry_run", *verb[1:])
    assert r.stdout.startswith("+ ") and "gcloud" in r.stdout, verb
  assert fake.calls() == []
  assert not (fake.root / "worker-0").exists()


def test_lifecycle_on_fake_workers(fake):
  """setup -> exec -> run -> status / logs -> stop -> logs from the bucket -> run again -> stop -> delete."""
  # setup: this checkout, copied
  r = fake.pod("setup", *LOC)
  calls = fake.calls()
  assert len(calls) == 2
  scp = calls[0]
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[4].endswith("/gemma2_jax_src.tgz")
  assert scp[5:] == ["tpu1:gemma2_jax_src.tgz", *G_LOC, "--worker=all"]
  rest, script = split_command(calls[1])
  assert rest == ssh("all", "")[:-1]
  assert "uv venv --quiet --seed --python 3.11 .venv" in script
  assert 'uv pip install --quiet --python .venv/bin/python -e ".${EXTRAS:+[$EXTRAS]}"' in script
  for i in range(WORKERS):
    src = fake.root / f"worker-{i}" / "gemma2_jax"
    assert (src / "scripts" / "pod.sh").is_file() and (src / "pyproject.toml").is_file()
    assert not (src / ".venv" / "lib").exists() and not (src / ".git").exists()
    assert f"worker {i}: {src} ready: Python 3." in r.stdout
  uv = (fake.root / "uv.log").read_text().splitlines()
  assert uv.count("pip install --quiet --python .venv/bin/python -e .[tpu]") == WORKERS

  # exec: foreground, in the project with the venv
  r = fake.pod("exec", *LOC, "--", "SMOKE=1", "sh", "-c", 'echo "$SMOKE in $(pwd) with $(command -v python)"')
  assert [c[:-1] for c in fake.calls()] == [ssh("0", "")[:-1]]
  venv = fake.root / "worker-0" / "gemma2_jax" / ".venv"
  assert r.stdout.splitlines()[-1] == f"1 in {venv.parent} with {venv}/bin/python"
  r = fake.pod("exec", *LOC, "--worker=1", "--", "exit 3", check=False)  # one word: a command line
  assert r.returncode == 3 and fake.calls()[0][-2] == "--worker=1"

  # run: detached on every worker, log per worker, copied to the workdir's bucket folder
  train = ["python", str(fake.root / "fake_train.py"), "--workdir=gs://bkt/runs/d9", "--distributed"]
  dry = fake.pod("run", *LOC, "--log_every_s=1", "--dry_run", "--", *train)
  r = fake.pod("run", *LOC, "--log_every_s=1", "--", *train)
  (call,) = fake.calls()
  assert printed_commands(dry.stdout) == [call]  # --dry_run prints exactly what runs, script included
  rest, script = split_command(call)
  assert rest == ssh("all", "")[:-1]
  assert f"CMD={shlex.quote(shlex.join(train))} URI=gs://bkt/runs/d9/logs EVERY=1" in script
  for i in range(WORKERS):
    assert f"worker {i}: started" in r.stdout
    assert f"copied to gs://bkt/runs/d9/logs/worker-{i}.log" in r.stdout
  fake.wait_for("step 3")
  for i in range(WORKERS):
    where = f"cwd {fake.root}/worker-{i}/gemma2_jax"
    assert f'argv ["--workdir=gs://bkt/runs/d9", "--distributed"] {where}' in fake.worker_log(i)

  r = fake.pod("status", *LOC)
  (describe, status) = fake.calls()
  assert describe == ["compute", "tpus", "queued-resources", "describe", "tpu1", *G_LOC,
                      "--format=value(state.state)"]
  assert split_command(status)[0] == ssh("all", "")[:-1]
  assert "queued resource tpu1: ACTIVE" in r.stdout
  for i in range(WORKERS):
    assert f"worker {i}: running (process group" in r.stdout

  r = fake.pod("logs", *LOC, "--worker=1", "--lines=5")
  (call,) = fake.calls()
  assert split_command(call)[0] == ssh("1", "")[:-1] and "LINES=5 FOLLOW=''" in call[-1]
  assert len(r.stdout.splitlines()) == 5 and "step" in r.stdout

  r = fake.pod("run", *LOC, "--", *train, check=False)  # a job is running: refused on every worker
  refused = [line for line in r.stderr.splitlines() if line.startswith("error: worker ")]
  assert r.returncode == 1 and len(refused) == WORKERS and all("a job is still running" in x for x in refused)
  fake.calls()

  # bucket copies made while running
  deadline = time.monotonic() + 10
  bucket = fake.root / "bucket" / "bkt" / "runs" / "d9" / "logs"
  while not all((bucket / f"worker-{i}.log").exists() for i in range(WORKERS)):
    assert time.monotonic() < deadline, "no log copy in the bucket"
    time.sleep(0.1)

  # stop: SIGTERM, the job "saves" and exits 0; the final log reaches the bucket
  r = fake.pod("stop", *LOC, "--grace_s=20")
  (call,) = fake.calls()
  assert split_command(call)[0] == ssh("all", "")[:-1] and "GRACE=20" in call[-1]
  for i in range(WORKERS):
    assert f"worker {i}: SIGTERM to the job" in r.stdout and f"worker {i}: stopped, exit code 0" in r.stdout
    assert "preempted at step" in fake.worker_log(i)
    text = (bucket / f"worker-{i}.log").read_text()
    assert "stopped: preempted at step" in text and text.rstrip().endswith("exit code 0")
  assert "SIGKILL" not in r.stdout
  for i in range(WORKERS):  # what each worker ran to copy its log (every second here, and at exit)
    copy = ["storage", "cp", "--quiet", f"{fake.root}/worker-{i}/gemma2_jax_run/worker-{i}.log",
            f"gs://bkt/runs/d9/logs/worker-{i}.log"]
    assert fake.copies.count(copy) >= 2, fake.copies
  assert all(c[3].startswith(str(fake.root)) for c in fake.copies)
  r = fake.pod("status", *LOC)
  fake.calls()
  assert "worker 1: finished, exit code 0; log: === " in r.stdout

  r = fake.pod("logs", "--from=gs://bkt/runs/d9/logs", "--dest=fetched")
  assert fake.calls() == [["storage", "cp", "gs://bkt/runs/d9/logs/worker-*.log", "fetched/"]]
  assert sorted(p.name for p in (fake.root / "fetched").iterdir()) == ["worker-0.log", "worker-1.log"]

  # the same run again (a resume): allowed now, appended to the same logs
  fake.pod("run", *LOC, "--log_every_s=1", "--", *train)
  fake.calls()
  deadline = time.monotonic() + 10
  while not all(fake.worker_log(i).count("argv [") == 2 for i in range(WORKERS)):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  fake.pod("stop", *LOC)
  fake.calls()

  r = fake.pod("delete", *LOC, "--yes")
  assert fake.calls() == [["compute", "tpus", "queued-resources", "delete", "tpu1", *G_LOC, "--force",
                           "--quiet"]]


def test_stop_sends_sigkill_after_grace(fake):
  fake.pod("setup", *LOC, "--worker=0")
  train = f"cd / && python {fake.root / 'fake_train.py'} --stubborn"  # one word: a command line
  fake.pod("run", *LOC, "--worker=0", "--", train)
  fake.calls()
  deadline = time.monotonic() + 10
  while "step 2" not in fake.worker_log(0):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  start = time.monotonic()
  r = fake.pod("stop", *LOC, "--worker=0", "--grace_s=1")
  assert 1 <= time.monotonic() - start < 10
  assert "worker 0: still running after 1s: SIGKILL" in r.stdout
  assert "worker 0: stopped, exit code 137" in r.stdout
  r = fake.pod("stop", *LOC, "--worker=0")
  assert "worker 0: no job running" in r.stdout


def test_setup_from_a_repo_at_a_ref(fake):
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  r = fake.pod("setup", *LOC, f"--repo={ROOT}", f"--ref={head}", "--worker=1", "--extras=tpu,test")
  (call,) = fake.calls()  # no scp: the workers clone
  rest, script = split_command(call)
  assert rest == ssh("1", "")[:-1]
  assert f"REPO={ROOT} REF={head} EXTRAS=tpu,test" in script
  clone = fake.root / "worker-1" / "gemma2_jax"
  got = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                       check=True).stdout.strip()
  assert got == head and "worker 1:" in r.stdout
  assert (fake.root / "uv.log").read_text().splitlines()[-1].endswith("-e .[tpu,test]")


def test_sbatch_gpu(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "srun", '#!/bin/sh\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n'
                              'echo "cwd:$(pwd)"\nfor a in "$@"; do echo "arg:$a"; done\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  for key in [k for k in env if k.startswith("SLURM_")]:
    env.pop(key)
  r = subprocess.run(["bash", str(SBATCH), "--help"], env=env, capture_output=True, text=True)
  assert r.returncode == 0 and "usage" in r.stdout
  cmd = [".venv/bin/python", "-m", "gemma2_jax.train", "--config=configs/pretrain_9b.py",
         "--workdir=gs://bkt/runs/p9"]
  r = subprocess.run(["bash", str(SBATCH), *cmd], env=env, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "sbatch" in r.stderr
  env.update(SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_GPUS_ON_NODE="4",
             SLURM_CPUS_ON_NODE="32")
  r = subprocess.run(["bash", str(SBATCH), *cmd], env=env, capture_output=True, text=True, cwd="/")
  assert r.returncode == 0, r.stderr
  out = r.stdout.splitlines()
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out and f"cwd:{tmp_path}" in out
  args = [line[4:] for line in out if line.startswith("arg:")]
  assert args == ["--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=0", *cmd, "--distributed"]
  r = subprocess.run(["bash", str(SBATCH), *cmd, "--distributed"], env=env, capture_output=True, text=True)
  assert [line[4:] for line in r.stdout.splitlines() if line.startswith("arg:")] == args


def test_tpu_extra_pins_the_installed_jax():
  """The `tpu` extra is jax[tpu] at the installed jax: jaxlib and the libtpu built for it (a bare libtpu
  would be the newest, which this jax may not load), and libtpu stays out of the default install."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["optional-dependencies"]["tpu"] == [f"jax[tpu]=={metadata.version('jax')}"]
  assert not any("tpu" in dep for dep in project["dependencies"])

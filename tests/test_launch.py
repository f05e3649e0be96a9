"""launch/: shellcheck-clean, --dry_run prints what would run, local.sh stops the other
processes when one fails and passes SIGTERM on to all of them."""

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/local.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch")


def _bash(*args, env=None, timeout=60):
  return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=timeout)


def test_scripts_are_shellcheck_clean():
  assert shutil.which("shellcheck"), "shellcheck is needed (apt-get install shellcheck)"
  out = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def test_local_dry_run_prints_one_command_per_process():
  out = _bash("launch/local.sh", "--num_processes=3", "--devices_per_process=2",
              "--port=4567", "--python=python3", "--dry_run", "--",
              "--config=configs/code.py", "--workdir=/w d", "--config.mesh.shape=(6,1,1)")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert ("XLA_FLAGS=--xla_force_host_platform_device_count=2 "
            "JAX_COORDINATOR_ADDRESS=127.0.0.1:4567 JAX_NUM_PROCESSES=3 "
            f"JAX_PROCESS_ID={i} python3 -m mopd_jax.main") in line
    assert r"--workdir=/w\ d" in line and r"--config.mesh.shape=\(6\,1\,1\)" in line


@pytest.mark.parametrize("args,message", [
    (["--num_processes=0", "--", "--config=c"], "--num_processes='0'"),
    (["--num_processes=2", "--devices_per_process=x", "--", "--config=c"],
     "--devices_per_process='x'"),
    (["--num_processes=2", "--config=c"], "unknown option '--config=c'"),
    (["--num_processes=2", "--"], "no arguments for mopd_jax.main"),
])
def test_local_rejects_bad_options(args, message):
  out = _bash("launch/local.sh", *args)
  assert out.returncode == 2
  assert message in out.stderr


def _fake_python(tmp_path):
  """Stands in for python: process 1 fails at once; the others wait for SIGTERM and
  record it."""
  path = tmp_path / "fake_python"
  path.write_text(
      "#!/usr/bin/env bash\n"
      f"trap 'echo term > {tmp_path}/term_$JAX_PROCESS_ID; exit 0' TERM\n"
      "echo started $JAX_PROCESS_ID\n"
      f"[[ $JAX_PROCESS_ID != 1 || -e {tmp_path}/no_fail ]] || exit 3\n"
      "for _ in $(seq 600); do sleep 0.1; done\n")
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def test_local_stops_the_others_when_one_process_fails(tmp_path):
  start = time.time()
  out = _bash("launch/local.sh", "--num_processes=3", f"--python={_fake_python(tmp_path)}",
              "--port=4567", "--grace_s=5", "--", "--config=c")
  assert out.returncode == 3
  assert time.time() - start < 30
  assert "[process 0] started 0" in out.stdout and "[process 2] started 2" in out.stdout
  assert (tmp_path / "term_0").exists() and (tmp_path / "term_2").exists()


def test_local_passes_sigterm_to_every_process(tmp_path):
  (tmp_path / "no_fail").touch()
  proc = subprocess.Popen(["bash", "launch/local.sh", "--num_processes=2", "--port=4567",
                           f"--python={_fake_python(tmp_path)}", "--", "--config=c"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 30
  while proc.stderr.readline().find("process 1 is pid") < 0:
    assert time.time() < deadline
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 0
  assert (tmp_path / "term_0").exists() and (tmp_path / "term_1").exists()


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  out = _bash("launch/tpu_pod.sh", "--name=pod", "--zone=us-east5-a",
              "--accelerator_type=v5p-32", "--project=proj", "--spot", "--dry_run", "--",
              "--config=configs/code.py:qwen3_4b", "--workdir=/mnt/shared/run")
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create pod --zone=us-east5-a "
                             "--project=proj --accelerator-type=v5p-32")
  assert lines[0].rstrip().endswith("--spot")
  assert lines[1].startswith("+ git archive")
  assert "tpu-vm scp" in lines[2] and "--worker=all" in lines[2]
  assert "--worker=all" in lines[3] and "pip\\ install" in lines[3]
  assert "--worker=all" in lines[4] and "mopd_jax.main" in lines[4]
  assert "configs/code.py:qwen3_4b" in lines[4]
  assert lines[5].startswith("+ gcloud compute tpus tpu-vm delete pod")
  reuse = _bash("launch/tpu_pod.sh", "--name=pod", "--zone=z", "--accelerator_type=v4-8",
                "--reuse", "--keep", "--dry_run", "--", "--config=c")
  assert "tpu-vm describe pod" in reuse.stdout
  assert "tpu-vm create" not in reuse.stdout and "tpu-vm delete" not in reuse.stdout
  missing = _bash("launch/tpu_pod.sh", "--name=pod", "--dry_run", "--", "--config=c")
  assert missing.returncode == 2 and "--zone is required" in missing.stderr


def test_slurm_dry_run_takes_the_coordinator_from_the_job(tmp_path):
  out = _bash("launch/slurm_gpu.sbatch", "--dry_run", "--", "--config=configs/code.py")
  assert out.returncode == 0, out.stderr
  assert "JAX_COORDINATOR_ADDRESS=FIRST_NODE:PORT" in out.stdout
  not_in_job = _bash("launch/slurm_gpu.sbatch", "--", "--config=c")
  assert not_in_job.returncode == 2 and "not inside a SLURM job" in not_in_job.stderr
  # Inside a job (scontrol replaced by a stub that expands the node list).
  scontrol = tmp_path / "scontrol"
  scontrol.write_text("#!/usr/bin/env bash\nprintf 'gpu017\\ngpu018\\n'\n")
  scontrol.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
         "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "16",
         "SLURM_NTASKS_PER_NODE": "8", "SLURM_SUBMIT_DIR": ROOT}
  out = _bash("launch/slurm_gpu.sbatch", "--dry_run", "--", "--config=configs/code.py",
              env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("srun --kill-on-bad-exit=1")
  assert "JAX_COORDINATOR_ADDRESS=gpu017:21234 JAX_NUM_PROCESSES=16 TASKS_PER_NODE=8" in (
      out.stdout)
  assert "CUDA_VISIBLE_DEVICES" in out.stdout and "--config=configs/code.py" in out.stdout

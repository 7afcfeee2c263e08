"""
A run folder belongs to one run: its lock (flock, freed by the kernel when the process ends) and the refusal of a
folder holding another run's files. checkpoint.py writes and reads what is inside the folder; this module decides
whose it is.
"""
import fcntl
import json
import os
import shutil
from pathlib import Path

from cli import UserError

RUN_FILES = ("ckpt.pt", "args.json", "metrics.jsonl")
_held_locks = {}  # folder -> open lock file of this process (a second train.main in one process reuses it)


def lock_run_folder(run):
    """Take the folder's lock file (flock: the kernel frees it when the process ends, so a crash never leaves it
    stale); it holds our process id for the message another process gets."""
    run = run.resolve()
    if run in _held_locks:
        return
    f = open(run / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{run} is in use by process {holder} (a run is training there): wait for it to end, or "
                        f"pick another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[run] = f


def release_run_folder(run):
    f = _held_locks.pop(Path(run).resolve(), None)
    if f is not None:
        (Path(run) / "lock").unlink(missing_ok=True)
        f.close()


def claim_run_folder(run, resume_from=None, overwrite=False):
    """Make `run` this run's folder, or refuse (UserError) before anything is written:
    - a folder in use by another process (its lock) is refused;
    - a new run (resume_from None) refuses a folder holding another run's files (ckpt.pt, args.json, metrics.jsonl:
      also a run stopped before its first checkpoint) unless overwrite, which removes them;
    - resuming the run of another folder (--resume A --out B) copies A's checkpoint and metrics into B, which
      must be new (or overwrite): A stays as it was.
    Temporary files left by a killed writer are removed (we hold the lock: nobody else is writing)."""
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a folder")
    run.mkdir(parents=True, exist_ok=True)
    lock_run_folder(run)
    for tmp in run.glob("*.tmp"):  # weights.atomic_write's NAME.PID.tmp, our NAME.copy.tmp
        if tmp.name.rsplit(".", 2)[-2].isdigit() or tmp.name.endswith(".copy.tmp"):
            tmp.unlink()
    same = resume_from is not None and resume_from.parent.resolve() == run.resolve()
    held = [name for name in RUN_FILES if (run / name).exists()]
    if held and not same:
        if not overwrite:
            release_run_folder(run)
            what = ("a run" if "ckpt.pt" in held else
                    f"a run stopped before its first checkpoint ({', '.join(held)}, no ckpt.pt)")
            hint = f"continue it with --resume {run}, " if "ckpt.pt" in held else ""
            raise UserError(f"{run} already holds {what}: {hint}pick another --out, or add --overwrite to replace "
                            f"it")
        for name in held:
            (run / name).unlink()
    if resume_from is not None and not same:  # --resume A --out B: B starts as a copy of A
        shutil.copy2(resume_from, run / "ckpt.pt.copy.tmp")
        os.replace(run / "ckpt.pt.copy.tmp", run / "ckpt.pt")
        if (resume_from.parent / "metrics.jsonl").is_file():
            shutil.copy2(resume_from.parent / "metrics.jsonl", run / "metrics.jsonl")


def truncate_metrics(metrics_file, step):
    """Drop what was logged after the checkpoint a run resumes from."""
    if metrics_file.exists():
        lines = [ln for ln in metrics_file.read_text().splitlines() if ln.strip()]
        metrics_file.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))

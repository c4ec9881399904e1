"""`make gpu-check`: the project's CUDA paths proven by one command, reported in one table.

    python3 checks/gpu_check.py [--venv .venv-gpu | --python PYTHON] [--work gpu_check_out]

Without a CUDA device (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them all) it prints one
line and exits 0, having installed and run nothing. With one it
  1. builds VENV once: python3 -m venv, torch==2.13.0 from the package index (on Linux x86-64 PyPI's
     default build is the CUDA one; TORCH_INDEX_URL=URL picks another index), then this repository
     with its test extras (`pip install -e .[test]`); reused while pyproject.toml is unchanged;
  2. runs checks/cuda_checks.py in VENV: one table row per check (the list is in that file);
  3. exits with its status: 0 only if every row holds.

This file needs only the standard library, since it runs before the venv exists. It also holds the
table and the pass/fail rules (`Row`, `run_checks`, `render`, `exit_status`), which
tests/test_gpu_check.py checks on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TORCH = "torch==2.13.0"
NO_CUDA = "gpu-check: no CUDA device visible ({why}); nothing installed or run"


@dataclasses.dataclass
class Row:
    """One line of the table: a check, whether it holds, its figures and, when it fails, why."""

    check: str
    ok: bool
    figures: str = ""
    why: str = ""


def run_checks(checks: Sequence[tuple[str, Callable[[], Row]]], log=print) -> list[Row]:
    """Every (name, check) in order, each to one Row; a check that raises is a failed row named `name`
    that says what it raised (its traceback goes to `log`), and the later checks still run."""
    rows = []
    for name, check in checks:
        log(f"gpu-check: {name} ...")
        try:
            rows.append(check())
        except Exception as err:  # noqa: BLE001  (any failure of a check is a row of the table, not a crash)
            log(traceback.format_exc())
            rows.append(Row(name, False, why=f"{type(err).__name__}: {err}".splitlines()[0]))
        log(f"gpu-check: {name}: {'PASS' if rows[-1].ok else 'FAIL'}")
    return rows


def exit_status(rows: Sequence[Row]) -> int:
    """0 only if there are rows and every one holds."""
    return 0 if rows and all(r.ok for r in rows) else 1


def render(rows: Sequence[Row]) -> str:
    """The summary table (check | result | figures | why) and a verdict line naming the failed checks."""
    head = ("check", "result", "figures", "why")
    cells = [head] + [(r.check, "PASS" if r.ok else "FAIL", r.figures, r.why) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: " | ".join(v.ljust(w) for v, w in zip(c, widths))  # noqa: E731
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(c) for c in cells[1:]]
    failed = [r.check for r in rows if not r.ok]
    if not rows:
        out.append("gpu-check: FAIL (no checks ran)")
    elif failed:
        out.append(f"gpu-check: FAIL ({len(failed)} of {len(rows)}: {', '.join(failed)})")
    else:
        out.append(f"gpu-check: PASS ({len(rows)} of {len(rows)})")
    return "\n".join(out)


def visible_gpus(env: dict[str, str], smi_lines: Sequence[str] | None) -> tuple[int, str]:
    """(CUDA devices a process started with `env` may use, why none) from `nvidia-smi -L`'s lines (None: no
    nvidia-smi). CUDA_VISIBLE_DEVICES is read as CUDA reads it: the list up to its first negative entry."""
    mask = env.get("CUDA_VISIBLE_DEVICES")
    chosen = None if mask is None else []
    for d in (mask or "").split(","):
        if not d.strip() or d.strip().startswith("-"):
            break
        chosen.append(d.strip())
    if chosen == []:
        return 0, f"CUDA_VISIBLE_DEVICES={mask!r}"
    if smi_lines is None:
        return 0, "no nvidia-smi"
    gpus = [ln for ln in smi_lines if ln.startswith("GPU ")]
    if not gpus:
        return 0, "nvidia-smi lists no GPU"
    return len(gpus) if chosen is None else min(len(chosen), len(gpus)), ""


def nvidia_smi_lines() -> list[str] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        return subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def ensure_venv(venv: Path) -> Path:
    """VENV/bin/python with CUDA torch and this repository installed; built once per pyproject.toml."""
    python, stamp = venv / "bin" / "python", venv / ".gpu-check-installed"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest() + TORCH
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    print(f"gpu-check: installing {TORCH} and this repository into {venv} (once)", flush=True)
    index = ["--index-url", os.environ["TORCH_INDEX_URL"]] if os.environ.get("TORCH_INDEX_URL") else []
    for cmd in ([sys.executable, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                [str(python), "-m", "pip", "install", "-q", *index, TORCH],
                [str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[test]"]):
        subprocess.run(cmd, check=True)
    stamp.write_text(want)
    return python


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-gpu", help="venv to build or reuse (default .venv-gpu)")
    ap.add_argument("--work", type=Path, default=REPO / "gpu_check_out",
                    help="folder for the checkpoints, runs and logs (default gpu_check_out; replaced each time)")
    ap.add_argument("--python", type=Path, default=None,
                    help="use this interpreter as it is instead of VENV (it needs CUDA torch and this repository's "
                         "dependencies; the repository goes on PYTHONPATH): for a machine without a package index")
    a = ap.parse_args(argv)
    gpus, why = visible_gpus(dict(os.environ), nvidia_smi_lines())
    if gpus == 0:
        print(NO_CUDA.format(why=why))
        return 0
    env = dict(os.environ)
    if a.python is None:
        python = ensure_venv(a.venv.resolve())
    else:
        python = a.python
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.call([str(python), str(HERE / "cuda_checks.py"), "--work", str(a.work.resolve())], cwd=REPO,
                           env=env)


if __name__ == "__main__":
    sys.exit(main())

"""A recipe's run folder and its writer: one at a time, and a resume that continues exactly or refuses.

    RUN/writer.lock            who writes RUN now: host, pid, process start, since (removed at the end)
    RUN/elastify_config.json   the resolved config the run started with, and fingerprints of the
                               parent's weights and of the data (written first, under the lock)
    RUN/data                   the token store a .jsonl / .parquet --data or the synthetic set is
                               prepared into, once (a store folder given as --data is read in place)

Written for elastify (below); quantize's QRUN is kept the same way (`Recipe`: QRUN/quantize_config.json
with the fingerprints of the elastic run and the data; quant/qad.py says which keys may change).

One writer. Before anything is written (importance scores included) rank 0 takes RUN/writer.lock: an
exclusive `flock` on the file (the kernel drops it when the process ends, however it ends) plus a
record of the holder. A live holder — the flock is held, or the recorded pid on this host is
running with the recorded start time — is refused in one line naming it. A stale one (same host,
pid gone or reused) is taken over with a note. A lock recorded by another host is refused: this
host cannot see that process, and whether flock reaches across hosts depends on the file system;
delete RUN/writer.lock once that job has ended. Under torchrun only rank 0 takes the lock; the
other ranks wait for its decision and fail with it.

Start, continue, start again (`resume`, `overwrite`):
  * a new run needs RUN absent, empty, or holding only a run that never got past writing its
    config (a start refused later, e.g. for bad data): nothing is lost by starting there;
  * RUN holding a run (importance scores, weights, metrics or checkpoints) is refused unless
    `resume` (continue it) or `overwrite` (delete every file a run writes, then start; other files
    in RUN are left alone); a non-empty folder that holds no run is always refused;
  * `resume: true` continues from RUN/checkpoints/latest and is an error without one;
    `resume: auto` continues when there is a checkpoint, starts when RUN holds no run, and starts
    the same run again when it holds one without a checkpoint (killed before its first one): its
    importance scores and prepared data are kept (reused only if made from this parent and data).

What a resume may change. Resuming means continuing the saved run exactly, so every key that
decides what the run computes must equal the saved one, or the resume is refused naming the key,
its old and new value: the parent's weights and the data (by fingerprint: a moved folder is the
same parent), the whole `elastic` block (budgets, budget type, mode and tolerance, axes,
fractions, choices, multiple, router width, memory assumptions: the grid, the router's shapes and
the cost windows), seed, steps and the stage schedule (fractions, sequence lengths, stage-2
probabilities, tau: the learning-rate and temperature curves and every step's batch and budget
are functions of them), batch size, optimizer and its rates, clipping, loss weights and
temperature, settle_every, budget_sampling, the router fit and the calibration (the state the run
started from). Free to change (`RUN_KEYS`): how the steps are computed (the `engine` block:
parallelism, dtype, checkpointing, offload, micro-batches, KD chunk, load mode, memory figure,
device; the checkpoints reshard across them) and when the run stops or saves; except the
micro-batch size under budget_sampling micro_batch, where it decides how many budgets a step draws.

Fingerprints. SHA-256 over each file's relative name and size, the whole file when it is at most
PIECES x PIECE bytes (configs, tokenizers, small models), else its safetensors header (names,
dtypes, shapes, offsets) and PIECES evenly spaced PIECE-byte pieces: 4 MiB read per file,
wherever it lies (a full SHA-256 of a 60 GB parent reads all 60 GB: minutes). Two different
trainings of one architecture differ in nearly every byte, so any piece tells them apart; a
change confined to a stretch shorter than the stride between pieces (file size / 1024: 5 MB for
a 5 GB shard) can go unseen.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from star_elastic.config import ConfigError, check_out_dir, to_plain
from star_elastic.distributed import broadcast_json
from star_elastic.train.checkpoint import latest_checkpoint

PREPARED = "data"
"""RUN/data: the token store a .jsonl / .parquet --data or the synthetic set is prepared into (once)."""
LOCK = "writer.lock"
VERSION = 1
STATE = ("importance.safetensors", "run.json", "model", "router.safetensors", "latency_table.json", "metrics.jsonl",
         "checkpoints", "initial", PREPARED)
"""What a run writes besides its config and lock: RUN holds a run when one of these exists."""
RUN_KEYS = ("engine", "resume", "overwrite", "checkpoint_every", "stop_after", "save_initial", "out")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one recipe's run folder holds and what its resume compares."""

    name: str
    """The command (elastify, quantize): in messages, and the config record's file name."""
    state: tuple[str, ...]
    """What a run writes besides its config and lock: RUN holds a run when one of these exists."""
    run_keys: tuple[str, ...]
    """Config keys a resume may change: how the steps are computed, when the run stops or saves."""
    sources: tuple[str, ...] = ("model", "data")
    """Config keys naming the inputs, compared by fingerprint (a moved folder is the same input)."""

    @property
    def config_file(self) -> str:
        return f"{self.name}_config.json"

    @property
    def format(self) -> str:
        return f"star-elastic-{self.name}-config"


ELASTIFY = Recipe("elastify", STATE, RUN_KEYS)
PIECE, PIECES = 4096, 1024
BUILTIN_DATA = "synthetic"


# --- fingerprints -------------------------------------------------------------------------------
def fingerprint(path: str | Path, key: str = "model") -> str:
    """Hex SHA-256 identifying a model folder or data file (see the module docstring); the
    built-in synthetic data is "synthetic". `key` names the setting in the error for a missing path."""
    if str(path) == BUILTIN_DATA:
        return BUILTIN_DATA
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        raise ConfigError(f"{key} {str(path)!r}: no such file or folder")
    stats = tuple((str(f.relative_to(path)) if f != path else f.name, *_stat(f)) for f in files)
    return _fingerprint(str(path.resolve()), stats)


def _stat(f: Path) -> tuple[int, int, int, int]:
    st = f.stat()
    return st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


@functools.lru_cache(maxsize=8)
def _fingerprint(root: str, stats: tuple) -> str:
    """Cached by the files' names, sizes, inodes and times: computed once per process and parent."""
    h = hashlib.sha256()
    base = Path(root)
    for name, size, *_ in stats:
        h.update(f"{name}\0{size}\0".encode())
        _hash_sample(h, base if base.is_file() else base / name, size)
    return h.hexdigest()


def _hash_sample(h, path: Path, size: int) -> None:
    with open(path, "rb") as f:
        if size <= PIECE * PIECES:
            h.update(f.read())
            return
        if path.suffix == ".safetensors":  # u64 header length, then the JSON header
            h.update(f.read(min(int.from_bytes(f.read(8), "little"), size)))
        for i in range(PIECES):
            f.seek(i * (size - PIECE) // (PIECES - 1))
            h.update(f.read(PIECE))


# --- the writer lock ----------------------------------------------------------------------------
def _process_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after "(comm)" (state first); None where there is no such process
    (or no /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    stat = _process_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": stat[19] if stat else None,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _running(holder: dict) -> bool:
    """The recorded process exists on this host, is not a zombie and started when recorded (a
    reused pid started later)."""
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (KeyError, TypeError, ValueError):
        return False
    stat = _process_stat(int(holder["pid"]))
    if stat is None:
        return True  # no /proc: the pid exists, which is all we can tell
    return stat[0] != "Z" and holder.get("process_start") in (None, stat[19])


def _who(holder: dict) -> str:
    if not holder:
        return "a process that is just starting"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


@dataclasses.dataclass
class WriterLock:
    """RUN/writer.lock, held by this process until `release`."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, run: Path, log, name: str = "elastify") -> WriterLock:
        """Take RUN's lock (RUN exists), taking over a stale one with a note to `log`; a live
        holder or one on another host raises ConfigError naming it (and the command `name`)."""
        path = Path(run) / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            kernel = _flock(fd)
            if kernel is not False and _same_file(fd, path):
                break
            holder = _read(fd)
            os.close(fd)
            if kernel is False:
                raise ConfigError(f"{run}: another {name} is writing this run folder ({_who(holder)}); wait for "
                                  f"it to end or stop it")
        try:
            holder = _read(fd)
            if holder:
                _check_stale(holder, path, log, name)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file, then drop the flock (a process waiting on the old file retries on the new one)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _flock(fd: int) -> bool | None:
    """True: this process now holds the flock; False: another does; None: no flock on this file system."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """The locked file is still the one at `path` (a releasing holder may have just removed it)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {"pid": "?", "host": "?", "since": "? (unreadable lock file)"}
    return holder if isinstance(holder, dict) else {}


def _check_stale(holder: dict, path: Path, log, name: str) -> None:
    """The previous holder recorded in a lock file whose flock we got: take over, or raise."""
    run = path.parent
    if holder.get("host") != socket.gethostname():
        raise ConfigError(f"{path}: held by {_who(holder)}; this host cannot check whether that process still "
                          f"runs: if that job has ended, delete {path} and run again")
    if _running(holder):
        raise ConfigError(f"{run}: another {name} is writing this run folder ({_who(holder)}); wait for it to end "
                          "or stop it")
    log(f"note: {path}: taking over from {_who(holder)}, which has ended")


# --- start, continue, start again ---------------------------------------------------------------
def resume_setting(resume: bool | str, overwrite: bool) -> bool | str:
    """A config's `resume` (true, false or auto; a flag's text too) checked against its `overwrite`."""
    if isinstance(resume, str):  # a flag's text
        resume = {"true": True, "false": False}.get(resume.lower(), resume)
    if not (isinstance(resume, bool) or resume == "auto"):
        raise ConfigError(f"resume must be true, false or auto, got {resume!r}")
    if overwrite and resume is not False:
        raise ConfigError(f"overwrite (start again) and resume {resume!r} (continue) exclude each other")
    return resume


def run_record(cfg, recipe: Recipe = ELASTIFY) -> dict:
    """RUN/elastify_config.json's contents: the resolved config (nested elastic block filled in)
    and the fingerprints of the parent and the data (of `recipe.sources`)."""
    config = to_plain(cfg)
    return {"format": recipe.format, "version": VERSION, "config": config,
            **{f"{key}_fingerprint": fingerprint(getattr(cfg, key), key) for key in recipe.sources}}


def check_same_run(saved: dict, current: dict, run: Path, recipe: Recipe = ELASTIFY) -> None:
    """Refuse, naming the first key whose value shapes the state and differs (see the module
    docstring); a nested block (elastic) key by key."""
    old, new = saved.get("config", {}), current["config"]
    if new.get("budget_sampling") == "micro_batch":  # the micro-batch size decides the draws per step
        was, now = old.get("engine", {}).get("micro_batch_size"), new["engine"]["micro_batch_size"]
        if was != now:
            raise _changed("engine.micro_batch_size", was, now, run)
    for key, value in new.items():
        if key in recipe.run_keys + recipe.sources or key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            for sub, v in value.items():
                if sub in old[key] and old[key][sub] != v:
                    raise _changed(f"{key}.{sub}", old[key][sub], v, run)
        elif old[key] != value:
            raise _changed(key, old[key], value, run)
    for key in recipe.sources:
        if saved.get(f"{key}_fingerprint") != current[f"{key}_fingerprint"]:
            raise ConfigError(f"resume: {key} differs from the run's in {run}: {old.get(key)!r} (fingerprint "
                              f"{str(saved.get(f'{key}_fingerprint'))[:12]}) → {new[key]!r} (fingerprint "
                              f"{current[f'{key}_fingerprint'][:12]}); resume with the run's {key}, or overwrite to "
                              "start again")


def _changed(key: str, old, new, run: Path) -> ConfigError:
    return ConfigError(f"resume: {key} changed since {run} was started: {old!r} → {new!r}; it shapes the trained "
                       f"state, so resuming would not continue that run: resume with {old!r}, or overwrite to start "
                       "again")


def _holds_run(run: Path, recipe: Recipe) -> bool:
    return any((run / name).exists() for name in recipe.state)


def _clear(run: Path, recipe: Recipe, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete every file a run writes (not the lock, not `keep`); other files stay. Returns what went."""
    gone = []
    for name in recipe.state + (recipe.config_file,):
        path = run / name
        if name in keep or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        gone.append(name)
    return gone


def read_record(run: Path, recipe: Recipe = ELASTIFY) -> dict | None:
    """RUN's config record (RUN/elastify_config.json for elastify): None where there is none; an
    unreadable file or another kind of record raises ConfigError naming it."""
    path = run / recipe.config_file
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None
    if not isinstance(saved, dict) or saved.get("format") != recipe.format or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"{path}: not a {recipe.name} config record")
    return saved


def _saved_record(run: Path, recipe: Recipe) -> dict:
    try:
        saved = read_record(run, recipe)
    except ConfigError as err:
        raise ConfigError(f"{err}; overwrite to start again") from None
    if saved is None:
        raise ConfigError(f"resume: {run} has no {recipe.config_file} (written by an older star-elastic), so this "
                          "resume cannot be checked against it; overwrite to start again")
    return saved


def _decide(cfg, run: Path, current: dict, log, recipe: Recipe) -> Path | None:
    """Under the lock: the checkpoint to continue from, or None to start (clearing what must go)."""
    resume = cfg.resume
    if cfg.overwrite:
        gone = _clear(run, recipe)
        if gone:
            log(f"overwrite: removed the earlier run's {', '.join(gone)} from {run}")
        return None
    if not _holds_run(run, recipe):
        if resume is True:
            raise ConfigError(f"resume: {run} holds no run, so there is no checkpoint to resume from; start it "
                              "without resume (or with resume: auto)")
        return None
    if resume is False:
        raise ConfigError(f"{run} holds an earlier run; resume to continue it (resume: auto also starts it again "
                          "when it has no checkpoint) or overwrite to delete it and start again")
    check_same_run(_saved_record(run, recipe), current, run, recipe)
    checkpoint = latest_checkpoint(run / "checkpoints")
    if checkpoint is None:
        if resume is True:
            raise ConfigError(f"resume: {run} has no checkpoint to resume from (RUN/checkpoints/latest); use "
                              "resume: auto to start it again, or overwrite")
        _clear(run, recipe, keep=("importance.safetensors", PREPARED))
        log(f"resume auto: {run} has no checkpoint; starting the run again")
    return checkpoint


def _start(cfg, log, recipe: Recipe) -> tuple[WriterLock, Path | None]:
    """Rank 0: take the lock, decide, write RUN/elastify_config.json. Returns (lock, checkpoint)."""
    run = check_out_dir(cfg.out)
    current = run_record(cfg, recipe)
    if run.is_dir() and any(run.iterdir()) and not any((run / n).exists()
                                                       for n in recipe.state + (recipe.config_file, LOCK)):
        raise ConfigError(f"{run}: folder exists, is not empty and holds no {recipe.name} run; name a new folder")
    if cfg.resume is True and not run.exists():
        raise ConfigError(f"resume: {run} does not exist, so there is no checkpoint to resume from")
    run.mkdir(parents=True, exist_ok=True)
    lock = WriterLock.acquire(run, log, recipe.name)
    try:
        checkpoint = _decide(cfg, run, current, log, recipe)
        tmp = run / (recipe.config_file + ".tmp")
        tmp.write_text(json.dumps(current, indent=2) + "\n")
        tmp.replace(run / recipe.config_file)
    except BaseException:
        lock.release()
        raise
    return lock, checkpoint


@contextmanager
def open_run(cfg, rank: int, log, recipe: Recipe = ELASTIFY):
    """The run folder for this process's part of `recipe`'s run (`cfg.out`: its config has `out`,
    `resume`, `overwrite` and `recipe.sources`). Rank 0 takes the writer lock and decides
    (start, continue, start again or refuse); every rank receives the decision, so a refusal raises
    on all ranks alike (ConfigError, one line). Yields the checkpoint to continue from, or None;
    rank 0 releases the lock on exit, error included."""
    lock, decision, failure = None, {}, None
    if rank == 0:
        try:
            lock, checkpoint = _start(cfg, log, recipe)
            decision = {"checkpoint": None if checkpoint is None else str(checkpoint)}
        except Exception as err:  # every rank must hear of it before rank 0 raises
            failure, decision = err, {"error": str(err)}
    decision = broadcast_json(decision)
    if failure is not None:
        raise failure
    if "error" in decision:
        raise ConfigError(decision["error"])
    try:
        yield None if decision["checkpoint"] is None else Path(decision["checkpoint"])
    finally:
        if lock is not None:
            lock.release()

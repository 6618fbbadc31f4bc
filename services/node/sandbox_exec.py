"""The sandbox launcher: slot, privileges, rlimits, then exec bwrap. Standard library only.

Used two ways, with the same code:

- by `Sandbox.run` through the spawner (`serve` below: a small process started once per
  node, which forks each bwrap and runs `child_setup` in it; no interpreter start per
  run, and no fork of the large node process);
- as a program, `python -I -S sandbox_exec.py SPEC_JSON`, by `Sandbox.wrap`: an argv any
  spawner can run (the MCP client's stdio servers); it does the same steps and then
  `execv`s bwrap, so the spawner's child *is* the sandbox.

A spec names host paths, never file descriptors: this process opens them (as root when
the node is root), so the sandbox user never needs to traverse the node's directories,
and passes them to bwrap as `--bind-fd` / `--ro-bind-fd`.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import sys

UID_BASE = 200_000      # sandbox slot n runs as uid/gid UID_BASE + n (node running as root)
SLOTS = 512             # concurrent sandboxes per node work dir
FD_MARK = "@fd:"        # "@fd:<path>" in a spec's bwrap args: an O_PATH fd of <path>
READ_MARK = "@rfd:"     # "@rfd:<path>": an fd of <path> open for reading (the seccomp filter)
STAGE_DIR = "/tmp/.nexus-sandbox-stage"   # root-owned 0755; a tmpfs of staged binds on it
                                          # in the launcher's private mount namespace

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18


def acquire_slot(slots_dir: str) -> tuple[int, int]:
    """A free slot (flock held by the returned fd, close-on-exec, until the node closes it:
    never by a process of the sandbox)."""
    os.makedirs(slots_dir, mode=0o700, exist_ok=True)
    start = (os.getpid() * 7919) % SLOTS
    for i in range(SLOTS):
        slot = (start + i) % SLOTS
        fd = os.open(os.path.join(slots_dir, f"{slot}.lock"),
                     os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return slot, fd
    raise RuntimeError(f"all {SLOTS} sandbox slots are busy")


def chown_tree(path: str, uid: int, gid: int) -> None:
    """Give the slot's user the workspace (never following a symlink the tool left)."""
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def open_fds(args: list[str]) -> tuple[list[str], list[int]]:
    """Replace each "@fd:<path>" / "@rfd:<path>" by the number of an fd open on <path>."""
    out, fds = [], []
    for a in args:
        for mark, flags in ((FD_MARK, os.O_PATH), (READ_MARK, os.O_RDONLY)):
            if a.startswith(mark):
                fd = os.open(a[len(mark):], flags | os.O_CLOEXEC)
                fds.append(fd)
                a = str(fd)
        out.append(a)
    return out, fds


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def stage(paths: dict[str, str]) -> None:
    """Make host paths reachable by the sandbox user whatever their parents' modes.

    bwrap (run as the slot's unprivileged user) opens its bind sources by path, and a
    node's directories are often 0700. As root, in a private mount namespace of this
    process only (gone with it), mount a tmpfs on STAGE_DIR and bind each path there
    as STAGE_DIR/<name>.
    """
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    _check(_libc.mount(b"tmpfs", STAGE_DIR.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                       b"mode=0755,size=64k"), "mount staging tmpfs")
    for name, path in paths.items():
        target = os.path.join(STAGE_DIR, name)
        if os.path.isdir(path):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        _check(_libc.mount(path.encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
               f"bind {name}")


def ensure_stage_dir() -> None:
    """STAGE_DIR exists, is a real directory owned by root, mode 0755 (run as root)."""
    try:
        os.mkdir(STAGE_DIR, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(STAGE_DIR)
    import stat
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise RuntimeError(f"{STAGE_DIR} is not a root-owned directory")
    os.chmod(STAGE_DIR, 0o755)


def child_setup(paths: dict[str, str], limits: dict[str, int], uid: int | None) -> None:
    """In the bwrap child, before exec: stage (as root), rlimits, drop to the slot's uid."""
    if uid is not None:
        stage(paths)
    set_limits(limits)
    drop_privileges(uid)


def set_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        res = getattr(resource, name)
        resource.setrlimit(res, (value, value))   # RLIMIT_CPU: SIGKILL at the limit


def drop_privileges(uid: int | None) -> None:
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# -- the spawner: sandboxes forked from a small process ---------------------------------
#
# `Sandbox.run` does not fork the node: forking a process of 100 MB costs tens of ms (its
# page tables, copy-on-write faults while preexec code runs), and the child's peak RSS
# (ru_maxrss, carried across exec) would start at the node's size. `serve` runs as a small
# child of the node (`python -I -S sandbox_exec.py --serve FD`, started once, dying with
# it) and forks each sandbox from its own few MB. Protocol on the unix stream socket FD:
# frames of a 4-byte big-endian length and JSON; a `spawn` request carries the run's
# stdin, stdout and stderr as SCM_RIGHTS on its length prefix.
#   -> {"op": "spawn", "id", "args", "stage", "rlimits", "uid"}   (+3 fds)
#   <- {"id", "pid"}, later {"id", "status", "utime", "stime", "maxrss"} (from wait4)
#   -> {"op": "kill", "id"}: SIGKILL the run's process group (only while not yet reaped)
#   <- {"id", "error"}: the fork failed

_HEADER = 4


def _frame(obj: object) -> bytes:
    data = json.dumps(obj).encode()
    return len(data).to_bytes(_HEADER, "big") + data


def _recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def serve(fd: int) -> None:
    import signal
    import socket
    import threading

    _libc.prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG: gone with the node
    if os.getppid() == 1:
        os._exit(0)
    sock = socket.socket(fileno=fd)
    send_lock = threading.Lock()
    live: dict[int, int] = {}          # run id -> pid, until reaped
    live_lock = threading.Lock()

    def send(obj: object) -> None:
        with send_lock:
            sock.sendall(_frame(obj))

    def reap(rid: int, pid: int) -> None:
        _, status, ru = os.wait4(pid, 0)
        with live_lock:
            live.pop(rid, None)
        send({"id": rid, "status": status, "utime": ru.ru_utime, "stime": ru.ru_stime,
              "maxrss": ru.ru_maxrss})

    while True:
        try:
            head, fds, _, _ = socket.recv_fds(sock, _HEADER, 3)
            if len(head) < _HEADER:
                head += _recv_exact(sock, _HEADER - len(head))
            req = json.loads(_recv_exact(sock, int.from_bytes(head, "big")))
        except (EOFError, OSError, ValueError):
            os._exit(0)                # the node is gone (or spoke garbage): so are we
        rid = req.get("id")
        if req.get("op") == "kill":
            with live_lock:
                pid = live.get(rid)
                if pid is not None:    # not reaped: the pid is still this run's
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            continue
        try:
            pid = os.fork()
        except OSError as e:
            for f in fds:
                os.close(f)
            send({"id": rid, "error": f"fork: {e.strerror}"})
            continue
        if pid == 0:
            try:
                os.setpgid(0, 0)
                for i, f in enumerate(fds):
                    os.dup2(f, i)      # inheritable
                os.closerange(3, 65536)
                args, opened = open_fds(req["args"])
                for f in opened:
                    os.set_inheritable(f, True)
                child_setup(req["stage"], req["rlimits"], req["uid"])
                os.execv(args[0], args)
            except BaseException as e:  # noqa: BLE001 - said on the run's stderr
                os.write(2, f"sandbox-launch: {type(e).__name__}: {e}\n".encode())
            os._exit(126)
        for f in fds:
            os.close(f)
        with live_lock:
            live[rid] = pid
        send({"id": rid, "pid": pid})
        threading.Thread(target=reap, args=(rid, pid), daemon=True).start()


def main(argv: list[str]) -> None:
    if argv[1] == "--serve":
        serve(int(argv[2]))
        return
    spec = json.loads(argv[1])
    uid = None
    if os.geteuid() == 0:
        # the slot's lock is the node's (Sandbox.wrap holds it until release): a lock fd
        # here would be inherited by bwrap and the tool, which could unlock it
        if not isinstance(spec.get("slot"), int) or not 0 <= spec["slot"] < SLOTS:
            raise SystemExit("sandbox_exec: no slot in the spec (run as root: Sandbox.wrap)")
        ensure_stage_dir()
        uid = UID_BASE + spec["slot"]
        if spec.get("workspace"):
            chown_tree(spec["workspace"], uid, uid)
    args, fds = open_fds(spec["args"])
    for fd in fds:
        os.set_inheritable(fd, True)
    child_setup(spec["stage"], spec["rlimits"], uid)
    os.execv(args[0], args)


if __name__ == "__main__":
    main(sys.argv)

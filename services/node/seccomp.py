"""The sandbox's seccomp filter: classic BPF built here (no libseccomp), given to bwrap.

Denied with EPERM: tracing other processes (ptrace, process_vm_*), mounts and the new
mount API, namespaces (unshare, setns, clone with CLONE_NEW*; clone3 answers ENOSYS so
libc falls back to clone, whose flags a filter can read), keyrings, bpf,
perf_event_open, userfaultfd, io_uring (its operations bypass seccomp), module and kexec
loading, reboot, swap, acct, chroot, syslog, file handles; sockets other than unix, IPv4
and IPv6 (no netlink, no packet sockets: EAFNOSUPPORT), and raw sockets. Syscalls of
another ABI (i386, x32 on x86-64) kill the process. x86-64 and aarch64; elsewhere no
filter (`filter_bytes()` is None) and the docs say so.
"""

from __future__ import annotations

import errno
import platform
import struct

_LD_ABS = 0x20      # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35         # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45        # BPF_JMP | BPF_JSET | BPF_K
_AND = 0x54         # BPF_ALU | BPF_AND | BPF_K
_RET = 0x06         # BPF_RET | BPF_K
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
ERRNO = 0x00050000

_CLONE_NEW = 0x7E020000   # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET

_COMMON_NEW = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
               "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
               "fsmount": 432, "fspick": 433, "mount_setattr": 442}
ARCHES = {
    "x86_64": (0xC000003E, {
        "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "swapon": 167,
        "swapoff": 168, "reboot": 169, "acct": 163, "init_module": 175,
        "delete_module": 176, "kexec_load": 246, "keyctl": 250, "add_key": 248,
        "request_key": 249, "unshare": 272, "setns": 308, "perf_event_open": 298,
        "bpf": 321, "userfaultfd": 323, "process_vm_readv": 310, "process_vm_writev": 311,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "finit_module": 313,
        "kexec_file_load": 320, "chroot": 161, "syslog": 103, "iopl": 172, "ioperm": 173,
        **_COMMON_NEW}, {"clone": 56, "clone3": 435, "socket": 41}),
    "aarch64": (0xC00000B7, {
        "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41, "swapon": 224,
        "swapoff": 225, "reboot": 142, "acct": 89, "init_module": 105,
        "delete_module": 106, "kexec_load": 104, "keyctl": 219, "add_key": 217,
        "request_key": 218, "unshare": 97, "setns": 268, "perf_event_open": 241,
        "bpf": 280, "userfaultfd": 282, "process_vm_readv": 270, "process_vm_writev": 271,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "finit_module": 273,
        "kexec_file_load": 294, "chroot": 51, "syslog": 116,
        **_COMMON_NEW}, {"clone": 220, "clone3": 435, "socket": 198}),
}


def _i(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def filter_bytes(machine: str | None = None) -> bytes | None:
    """The filter as bwrap's `--seccomp FD` reads it (an array of sock_filter)."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        return None
    arch, denied, special = ARCHES[machine]
    eperm = ERRNO | errno.EPERM
    p = [_i(_LD_ABS, 4), _i(_JEQ, arch, 1, 0), _i(_RET, KILL_PROCESS), _i(_LD_ABS, 0)]
    if machine == "x86_64":     # x32 ABI numbers
        p += [_i(_JGE, 0x40000000, 0, 1), _i(_RET, KILL_PROCESS)]
    for nr in sorted(denied.values()):
        p += [_i(_JEQ, nr, 0, 1), _i(_RET, eperm)]
    p += [_i(_JEQ, special["clone3"], 0, 1), _i(_RET, ERRNO | errno.ENOSYS)]
    p += [_i(_JEQ, special["clone"], 0, 4), _i(_LD_ABS, 16), _i(_JSET, _CLONE_NEW, 0, 1),
          _i(_RET, eperm), _i(_RET, ALLOW)]
    p += [_i(_JEQ, special["socket"], 0, 10),
          _i(_LD_ABS, 16),                    # s0: family
          _i(_JEQ, 1, 2, 0),                  # s1: AF_UNIX -> s4
          _i(_JEQ, 2, 1, 0),                  # s2: AF_INET -> s4
          _i(_JEQ, 10, 0, 5),                 # s3: AF_INET6 -> s4, else s9
          _i(_LD_ABS, 24),                    # s4: type
          _i(_AND, 0xF),                      # s5
          _i(_JEQ, 3, 0, 1),                  # s6: SOCK_RAW -> s7, else s8
          _i(_RET, eperm),                    # s7
          _i(_RET, ALLOW),                    # s8
          _i(_RET, ERRNO | errno.EAFNOSUPPORT)]  # s9
    p.append(_i(_RET, ALLOW))
    return b"".join(p)

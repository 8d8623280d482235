"""The sandbox's seccomp filter (stdlib only; ``_sandbox_child.py`` loads it before it confines itself).
A classic-BPF program written here and installed with ``prctl(PR_SET_SECCOMP)``; no library needed.

Refused with EPERM, whatever the arguments: new processes and threads, exec; mount, pivot_root, chroot,
unshare, setns and the new mount API; ptrace, process_vm_readv/writev, kcmp, open_by_handle_at;
pidfd_open, pidfd_send_signal, pidfd_getfd; keyctl, add_key, request_key; io_uring (which would do
file and socket work without the calls below seeing it), bpf, perf_event_open, userfaultfd; socket
(no network, and no path-named Unix socket of the host's either).
Refused where they name another process (a pid other than 0 or our own): prlimit64,
sched_setaffinity, sched_setscheduler, sched_setparam, sched_setattr, migrate_pages, move_pages,
setpriority (PRIO_PROCESS only), ioprio_set (IOPRIO_WHO_PROCESS only), kill, tkill, tgkill,
rt_sigqueueinfo, rt_tgsigqueueinfo (so no kill(-1) either); prctl(PR_SET_PDEATHSIG) (the program
must die with its helper). fallocate fails with EOPNOTSUPP (glibc's posix_fallocate then writes the
blocks, within RLIMIT_FSIZE and the work dir's size). Other ABIs (x32, 32-bit) are refused.
"""

import ctypes
import os
import platform

_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*
# name -> (x86-64, arm64) syscall numbers
_DENIED: dict[str, tuple[int, int | None]] = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435), "execve": (59, 221),
    "execveat": (322, 281), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "open_by_handle_at": (304, 265), "kcmp": (312, 272),
    "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "process_madvise": (440, 440),
    "socket": (41, 198),
}
# name -> ((x86-64, arm64), ((argument index, the values allowed), ...)); SELF stands for our own pid
SELF = "self"
_SELF_ONLY: dict[str, tuple[tuple[int, int], tuple[tuple[int, tuple[int | str, ...]], ...]]] = {
    "prlimit64": ((302, 261), ((0, (0, SELF)),)), "sched_setaffinity": ((203, 122), ((0, (0, SELF)),)),
    "sched_setscheduler": ((144, 119), ((0, (0, SELF)),)), "sched_setparam": ((142, 118), ((0, (0, SELF)),)),
    "sched_setattr": ((314, 274), ((0, (0, SELF)),)), "migrate_pages": ((256, 238), ((0, (0, SELF)),)),
    "move_pages": ((279, 239), ((0, (0, SELF)),)), "setpriority": ((141, 140), ((0, (0,)), (1, (0, SELF)))),
    "ioprio_set": ((251, 30), ((0, (1,)), (1, (0, SELF)))),
    "kill": ((62, 129), ((0, (0, SELF)),)), "tkill": ((200, 130), ((0, (SELF,)),)),
    "tgkill": ((234, 131), ((0, (SELF,)),)), "rt_sigqueueinfo": ((129, 138), ((0, (0, SELF)),)),
    "rt_tgsigqueueinfo": ((297, 240), ((0, (SELF,)),)),
}
_PRCTL, _PR_SET_PDEATHSIG = (157, 167), 1
_FALLOCATE = (285, 47)
_EPERM, _EOPNOTSUPP = 1, 95
_LD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def program(machine: str, self_pid: int) -> list[tuple[int, int, int, int]] | None:
    """The filter for ``machine`` as (code, jt, jf, k) instructions, for a process whose own pid is
    ``self_pid`` (1 in its own PID namespace); None where we have no numbers."""
    if machine not in _ARCH:
        return None
    column = 0 if machine == "x86_64" else 1
    ops: list[tuple[int, int | str, int | str, int]] = [(_LD, 0, 0, 4), (_JEQ, 0, "deny", _ARCH[machine]),
                                                  (_LD, 0, 0, 0), (_JGE, "deny", 0, 0x40000000)]
    ops += [(_JEQ, "deny", 0, nr) for nr in (numbers[column] for numbers in _DENIED.values()) if nr is not None]
    ops += [(_JEQ, "enotsup", 0, _FALLOCATE[column]), (_JEQ, "prctl", 0, _PRCTL[column])]
    ops += [(_JEQ, f"self-{name}", 0, nr[column]) for name, (nr, _) in _SELF_ONLY.items()]
    labels: dict[str, int] = {}
    ops.append((_RET, 0, 0, _ALLOW))
    labels["prctl"] = len(ops)
    ops += [(_LD, 0, 0, 16), (_JEQ, "deny", 0, _PR_SET_PDEATHSIG), (_RET, 0, 0, _ALLOW)]
    for name, (_, checks) in _SELF_ONLY.items():
        labels[f"self-{name}"] = len(ops)
        for check, (index, allowed) in enumerate(checks):  # the low half one of the values, the high half 0
            values = [self_pid if value == SELF else int(value) for value in allowed]
            high = f"high-{name}-{check}"
            ops.append((_LD, 0, 0, 16 + 8 * index))
            ops += [(_JEQ, high, "deny" if i == len(values) - 1 else 0, v) for i, v in enumerate(values)]
            labels[high] = len(ops)
            ops += [(_LD, 0, 0, 20 + 8 * index), (_JEQ, 0, "deny", 0)]
        ops.append((_RET, 0, 0, _ALLOW))
    labels["deny"] = len(ops)
    ops.append((_RET, 0, 0, _ERRNO | _EPERM))
    labels["enotsup"] = len(ops)
    ops.append((_RET, 0, 0, _ERRNO | _EOPNOTSUPP))
    return [(code, _offset(labels, jt, i), _offset(labels, jf, i), k) for i, (code, jt, jf, k) in enumerate(ops)]


def _offset(labels: dict[str, int], target: int | str, at: int) -> int:
    if isinstance(target, int):
        return target
    offset = labels[target] - at - 1
    if not 0 <= offset < 256:
        raise ValueError(f"sandbox: seccomp jump to {target} out of range")
    return offset


def install(libc: ctypes.CDLL) -> bool:
    """Install the filter on this process (needs PR_SET_NO_NEW_PRIVS); False where it cannot."""
    code = program(platform.machine(), os.getpid())
    if code is None:
        return False

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(code))(*[Filter(*op) for op in code])
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(Program(len(code), filters)), 0, 0) == 0

"""Emulates a CPU without AMX on one with it (Linux x86-64): `COPD_TEST_NO_AMX=1 python -m
pytest` times the suite as a 2-core machine without AMX would run it, on this one.

Why not an XLA flag: `--xla_cpu_max_isa=AVX512` (or AVX2) caps only the code XLA's LLVM
backend generates. XLA:CPU hands dots to YNNPACK, which detects the CPU's features itself
and ignores that flag: with it set, bf16 x bf16 -> f32 dots still run on AMX tiles.

How: Linux lets a process use AMX tiles only after it asks the kernel for permission
(`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`). A seccomp filter makes that request
fail with EPERM, so YNNPACK (and oneDNN) see no AMX and take their AVX-512 kernels. The
filter is inherited by every child: pytest-xdist workers and the subprocesses tests start.
Nothing else changes (no other system call is filtered).
"""
import ctypes
import os
import platform
import struct

ARCH_REQ_XCOMP_PERM = 0x1023
SYS_ARCH_PRCTL = 158  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, EPERM = 0x7FFF0000, 0x00050000, 1
# classic BPF opcodes
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
  return struct.pack("HBBI", code, jt, jf, k)


def _filter_program() -> bytes:
  """seccomp_data: nr at offset 0, arch at 4, args[0] (low 32 bits) at 16."""
  return b"".join([
      _insn(LD_W_ABS, 0, 0, 4),
      _insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
      _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),            # another ABI: leave it alone
      _insn(LD_W_ABS, 0, 0, 0),
      _insn(JEQ_K, 0, 3, SYS_ARCH_PRCTL),               # not arch_prctl: allow
      _insn(LD_W_ABS, 0, 0, 16),
      _insn(JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),          # another arch_prctl: allow
      _insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
      _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
  ])


def supported() -> bool:
  return platform.system() == "Linux" and platform.machine() == "x86_64"


def deny_amx() -> None:
  """Installs the filter in this process (and so in every process it starts from now on).
  Call before anything uses AMX (before the first dot). Raises OSError if the kernel
  refuses the filter, RuntimeError off Linux x86-64."""
  if not supported():
    raise RuntimeError("COPD_TEST_NO_AMX emulates a CPU without AMX on Linux x86-64 only")
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                         ctypes.c_ulong]
  program = _filter_program()
  code = ctypes.create_string_buffer(program, len(program))
  fprog = ctypes.create_string_buffer(
      struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(code)))
  # no_new_privs is required for an unprivileged process to install a filter.
  if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or libc.prctl(
      PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"could not install the no-AMX seccomp filter: {os.strerror(err)}")


def amx_permission_granted() -> bool:
  """Whether the kernel grants this process AMX tile data (the request YNNPACK and oneDNN
  make before they use AMX). False on a CPU without AMX and under deny_amx()."""
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_ulong]
  xfeature_xtiledata = 18
  return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, xfeature_xtiledata) == 0

"""kvcompile's exceptions: one typed family, one documented exit code per kind of failure.

Every error a user can cause is one of these, raised with a one-line message that names the
problem (and what to do about it). The command line prints that line and exits with the kind's
code; the Python API raises the exception itself. Importing this module imports nothing heavy.

exit code  kind             meaning
        0                   success
        1  InternalError    a bug in kvcompile (rerun with --verbose for the traceback, and report it)
        2  UsageError       bad options or arguments: fix the command or the call
        3  InputError       a model, checkpoint or artifact kvcompile cannot use as it is
        4  RuntimeFailure   the inputs were fine but running failed (memory, kernels, context length)
      130                   interrupted (Ctrl-C)
"""
from __future__ import annotations


class KvcompileError(Exception):
    """Base of every kvcompile error; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InternalError(KvcompileError):
    exit_code = 1


class UsageError(KvcompileError, ValueError):
    """Bad options or arguments (CLI flags, API arguments, input tensors)."""

    exit_code = 2


class InputError(KvcompileError):
    """A model, checkpoint or artifact kvcompile cannot use as it is."""

    exit_code = 3


class RuntimeFailure(KvcompileError, RuntimeError):
    """Valid inputs, but running failed."""

    exit_code = 4


# --- usage ---------------------------------------------------------------------------------
class ConfigError(UsageError):
    """A CacheConfig value that kvcompile cannot honour."""


class TargetError(UsageError):
    """An export target kvcompile does not know."""


class InputValidationError(UsageError):
    """Token ids, masks or prompts that do not fit the model (checked before anything runs)."""


class ContextLengthError(UsageError):
    """More tokens than the model's positions allow."""


# --- input ---------------------------------------------------------------------------------
class LoadError(InputError, RuntimeError):
    """A checkpoint that cannot be loaded; the message is one line naming the problem."""


class ArtifactError(InputError, RuntimeError):
    """An artifact folder that cannot be written or must not be loaded."""


class TraceError(InputError, RuntimeError):
    """torch.export could not trace the model; the message names the model and the cause."""


class UnsupportedAttentionError(InputError, RuntimeError):
    """A layer's attention uses a feature kvcompile cannot represent exactly; names layer and feature."""


class OnnxExportError(InputError, RuntimeError):
    """The compiled graph could not be exported to ONNX."""


# --- runtime -------------------------------------------------------------------------------
class HostMemoryError(RuntimeFailure):
    """Pinned host memory for the V cache could not be allocated."""


class KernelLibraryError(RuntimeFailure):
    """The kernel library could not be built or loaded."""


EXIT_CODES = {0: "success", 1: "internal error (a bug: rerun with --verbose and report it)",
              2: "usage error (options, arguments, input tensors)",
              3: "input error (model, checkpoint or artifact)",
              4: "runtime failure (memory, kernels)", 130: "interrupted"}

"""Exceptions that map to the CLI's exit codes (see README: exit codes)."""

from __future__ import annotations


class DerestoreError(Exception):
    """Base class: `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(DerestoreError):
    """A bad argument, path, option value or registry entry (exit 2)."""

    exit_code = 2


class ModelUnavailable(DerestoreError):
    """A checkpoint that cannot be found, fetched, verified or loaded (exit 3).

    `alternatives`: bundled models of the same task, which need no download.
    """

    exit_code = 3
    alternatives: tuple[str, ...] | list[str] = ()


class InputError(DerestoreError):
    """One input file that cannot be read or decoded; the batch goes on (exit 1 at the end)."""

    exit_code = 1


class DeviceFailure(DerestoreError):
    """The device cannot go on (a CUDA error that poisons the context): the run stops, exit 1."""

    exit_code = 1


class ExportError(ModelUnavailable):
    """The network does not export to ONNX, or the exported graph is not exact (exit 3)."""

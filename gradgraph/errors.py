"""Exceptions raised by gradgraph. Every message names the module, parameter or file involved and what
would work instead."""


class GradGraphError(Exception):
    """Base class of gradgraph's errors."""


class UnsupportedModuleError(GradGraphError, TypeError):
    """A module with trainable parameters has no capture rule, or a rule cannot handle its configuration."""


class SampleMixingError(GradGraphError, ValueError):
    """The model mixes samples of the batch (BatchNorm in training mode, a reduction over the batch axis,
    an op shared across samples), so per-sample gradients are not defined by per-element (a, g) pairs."""


class NonFiniteGradientError(GradGraphError, FloatingPointError):
    """An activation or an output gradient captured for the graph contains inf or NaN."""


class LossShapeError(GradGraphError, ValueError):
    """A loss function did not return one value per sample."""


class SetSizeMismatchError(GradGraphError, ValueError):
    """Graphs with different set sizes were combined where every graph must have the same set size."""


class StructureMismatchError(GradGraphError, ValueError):
    """A symmetry, a parameter dict or a metanetwork output does not match the graph or model it is applied to."""


class UnknownNameError(GradGraphError, ValueError):
    """A name (model, metanetwork, task, benchmark, engine) that no registry holds."""


class NotAModelFactoryError(GradGraphError, TypeError):
    """A ``package.module:attribute`` model target that is not a model class or a declared model factory, or a
    factory that returned something other than a model."""


class FileFormatError(GradGraphError, ValueError):
    """A stored file (dataset, checkpoint, graph) is of another kind or format version, or is corrupted."""


class ConfigError(GradGraphError, ValueError):
    """A setting (a config field, a command-line option) has a value outside what works."""


class RunDirConflictError(GradGraphError, FileExistsError):
    """A run folder holds the files of a run with other settings."""

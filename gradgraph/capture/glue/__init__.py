"""The built-in glue handlers of the tracer, one file per family; importing this package registers them.

    elementwise.py  unary/binary elementwise ops, pooling, reductions, softmax, normalizations, attention,
                    cat/stack, functional batch_norm
    shapes.py       permute/transpose, view/reshape/flatten/squeeze, expand, indexing, split/chunk/unbind
    contract.py     matmul/@/mm/bmm/einsum between tensors without parameters

Each handler is ``handler(tracer, call) -> Label | list[Label | None] | None`` (see
:func:`gradgraph.capture.tracer.register_glue`); a user handler for the same name replaces the built-in one.
"""
from . import contract, elementwise, shapes  # noqa: F401  (registers the built-in handlers)

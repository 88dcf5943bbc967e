"""Arrays over raw addresses, for the fused loops: a buffer's address as a typed pointer, and a contiguous window of an
array (a slice is typed as non-contiguous, 'A' layout, and its loop is not vectorised)."""
import numba
from numba import types as numba_types
from numba.extending import intrinsic

from .jit import jit


@intrinsic
def address_as_pointer(typingctx, address, like):
    """Reinterpret an int64 address as a pointer to ``like``'s element type."""
    signature = numba_types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@jit
def window(array, offset, length):
    """``array[offset:offset + length]`` as a contiguous array."""
    return numba.carray(address_as_pointer(array.ctypes.data + offset * array.itemsize, array), length)

"""Exceptions and warnings raised by qcnn.

Every error a user can cause (a bad file, a bad shape, an unknown layer) is a
:class:`QcnnError` whose message is one line naming the file or layer and the
problem; the command line prints it and exits non-zero.
"""


class QcnnError(Exception):
    """A problem with user input: a file, a model, a layer or an array."""


class QcnnWarning(UserWarning):
    """Something was ignored (an unknown prototxt field, say) but loading went on."""

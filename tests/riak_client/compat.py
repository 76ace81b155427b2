"""Lets the Riak Python client 2.7.0 (2016) import on Python 3.10 and later.

It imports the abstract base classes from `collections` (moved to `collections.abc` in 3.3,
the old names removed in 3.10) and calls `collections.namedtuple(..., verbose=False)` (the
argument was removed in 3.7). Importing this module first puts both back. Nothing else of
the client is changed: the conformance suite tests the client as users install it.
"""

import collections
import collections.abc

for _name in ("Mapping", "MutableMapping", "Iterable", "Sequence", "Sized", "Set", "Callable"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

_namedtuple = collections.namedtuple


def _namedtuple_without_verbose(*args, verbose=False, **kwargs):
    return _namedtuple(*args, **kwargs)


collections.namedtuple = _namedtuple_without_verbose

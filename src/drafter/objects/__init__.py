"""Packages in object storage: an S3 bucket or any HTTP server, no registry on the path.

- :mod:`~drafter.objects.location`: ``s3://`` and ``http(s)://`` locations, the store
  client and its credentials;
- :mod:`~drafter.objects.source`: :class:`ObjectSource`, a package object as a chunk
  source (lazy start straight from the store);
- :mod:`~drafter.objects.upload`: writing a package to a store, never seen half done.
"""

from drafter.objects.location import ObjectLocation, StoreOptions, is_object_url, parse_location
from drafter.objects.source import ObjectChanged, ObjectSource, StoreError

__all__ = [
    "ObjectChanged",
    "ObjectLocation",
    "ObjectSource",
    "StoreError",
    "StoreOptions",
    "is_object_url",
    "parse_location",
]

"""The built-in streams beyond ``split-digits`` (registered in :data:`polytask.continual.stream.STREAMS` on import)
and a user's own torch Datasets as a stream (:func:`stream_from_datasets`)."""

from polytask.continual.streams import mnist, mnist1d, table_split
from polytask.continual.streams.datasets import stream_from_datasets

__all__ = ["mnist", "mnist1d", "stream_from_datasets", "table_split"]

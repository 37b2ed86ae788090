"""poprt-lite on Ray (`pip install 'poprt-lite[ray]'`): batch embedding on Ray Data (`embed_dataset`,
data.py), the cluster a command runs on (cluster.py).

Every worker opens the artifact once, from bytes shipped through Ray's object store (`ray.put`): the
nodes need no copy of the model and no shared filesystem.
"""

from poprt_lite.apps.ray.data import embed_dataset

__all__ = ["embed_dataset"]

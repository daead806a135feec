"""Hub repos as checkpoint sources: headers through HTTP range requests, or only the checkpoint files downloaded.

:class:`~shardkit.hub.remote.HubRepo` lists a repo and reads its index and shard headers without the tensor
data; :func:`~shardkit.hub.download.download_checkpoint` fetches just the checkpoint files into
huggingface_hub's cache. Everything goes through huggingface_hub (``HF_ENDPOINT``, tokens, offline mode).
"""

from ..sources import open_remote_checkpoint
from .download import download_checkpoint
from .remote import HubRepo, looks_like_repo_id

__all__ = ["HubRepo", "download_checkpoint", "looks_like_repo_id", "open_remote_checkpoint"]

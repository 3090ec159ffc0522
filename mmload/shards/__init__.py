"""Making shards: record sources (builtin, folder, text) and the webdataset writer they all go through."""

from mmload.manifest import MANIFEST, manifest_beside, read_manifest, write_json
from mmload.shards.builtin import CLASS_NAMES, GENERATOR_VERSION, builtin_records, pydoc_corpus
from mmload.shards.folder import folder_classes, folder_records, text_records
from mmload.shards.writer import write_shards

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "MANIFEST",
    "builtin_records",
    "folder_classes",
    "folder_records",
    "pydoc_corpus",
    "manifest_beside",
    "read_manifest",
    "text_records",
    "write_json",
    "write_shards",
]

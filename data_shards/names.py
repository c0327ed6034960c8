"""The data's vocabulary, defined once and imported everywhere: splits, streams, text kinds."""

SPLITS = ("train", "val", "test")  # per user, disjoint (data_shards.prepare.split_per_user)
# Document streams, each its own shard folder: collab (a user's train items, for the
# collaborative LM), rec (a user, for the recommendation head) and content (one text).
STREAMS = ("collab", "rec", "content")
ITEM_TEXT_KINDS = ("title", "brand", "categories", "description")
TEXT_KINDS = ("review", *ITEM_TEXT_KINDS, "tags", "biography")

"""Search: use an export the way a search team will: index a corpus, then query the index.

Both sides embed through plain sentence-transformers, as the export is served: documents
without a prompt, queries with the export's ``query`` prompt. An index folder's manifest
names the export that built it (path and weights digest), so a query is never embedded by
another model than the documents were.
"""

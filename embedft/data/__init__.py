"""Data: files -> validated examples -> splits and evaluation tasks -> training batches.

`readers` reads a file of any supported format into a table; `examples` turns it into
labeled, grouped or pairs examples, validates and splits them; `batches` draws the
training batches from them.
"""

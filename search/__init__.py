"""Semantic search: index a corpus through the server into a vector store and rank documents for queries.

    documents.py   reading a corpus file (text lines, TSV/CSV, JSON lines, Parquet) as documents
    filters.py     the metadata filter language (parse once, render for each store)
    metrics.py     nDCG@k, recall@k, MRR@k as BEIR computes them; queries/qrels files
    store.py       the store interface and `open_store(uri)`
    embedded.py    the embedded default store: a directory (SQLite + a FAISS HNSW index + FTS5 BM25)
    indexer.py     `embedline index`: a corpus file -> the server's embeddings -> a collection
    evaluate.py    `embedline eval-retrieval`

It sits above the client (it embeds through a running server) and below serving (which serves a store).
"""

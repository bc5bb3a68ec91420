"""Training config overrides and the data readers: clear errors on bad input."""

import gzip

import pytest

from embedline.training.simcse import config as cfg
from embedline.training import data


def test_overrides_parse_types_and_reject_unknown_keys():
    config = cfg.apply_overrides(cfg.TrainConfig(), cfg.parse_overrides(
        ["--lr=1e-4", "--batch-size", "32", "--random_layers=true", "--dropout=none", "--temperature=0.1"]))
    assert (config.lr, config.batch_size, config.random_layers, config.dropout, config.temperature) == (
        1e-4, 32, True, None, 0.1)
    with pytest.raises(cfg.ConfigError, match=r"unknown training config key\(s\) tempreature; valid keys: .*temperature"):
        cfg.apply_overrides(cfg.TrainConfig(), {"tempreature": "0.1"})
    with pytest.raises(cfg.ConfigError, match="--batch_size=abc: expected int"):
        cfg.apply_overrides(cfg.TrainConfig(), {"batch_size": "abc"})
    with pytest.raises(cfg.ConfigError, match="--objective must be one of"):
        cfg.apply_overrides(cfg.TrainConfig(), {"objective": "simclr"})
    with pytest.raises(cfg.ConfigError, match="--batch_size must be >= 2"):
        cfg.apply_overrides(cfg.TrainConfig(), {"batch_size": "1"})


def test_resolve_fills_paper_defaults(tiny_model_dir, tmp_path):
    unsup = cfg.resolve_config(cfg.TrainConfig(model=str(tiny_model_dir), train_file="x.txt", output=str(tmp_path / "o")))
    assert (unsup.lr, unsup.pooling, unsup.temperature, unsup.max_seq_length, unsup.epochs) == (3e-5, "mean", 0.05, 32, 1)
    assert unsup.name == "o" and unsup.precision in ("fp32", "bf16", "fp16")
    sup = cfg.resolve_config(cfg.TrainConfig(objective="sup", model=str(tiny_model_dir), train_file="x.csv",
                                             output=str(tmp_path / "o"), pooling="cls"))
    assert (sup.lr, sup.pooling) == (5e-5, "cls")
    # The resolved config round-trips through a dict (checkpoints, embedline.json).
    assert cfg.from_dict(cfg.to_dict(sup)) == sup


def test_text_reader_skips_and_counts_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("a man plays the guitar\n\n   \nthe cat sleeps\n")
    loaded = data.load_training_data(path, "unsup")
    assert loaded.columns == (("a man plays the guitar", "the cat sleeps"),)
    assert loaded.skipped_empty == 2 and len(loaded) == 2


def test_too_few_distinct_sentences(tmp_path):
    path = tmp_path / "same.txt"
    path.write_text("the cat sleeps\nthe cat sleeps\n")
    with pytest.raises(data.DataError, match="fewer than 2 distinct sentences"):
        data.load_training_data(path, "unsup")


def test_csv_triples_pairs_and_labels(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\n"a man, smiling",a man,a woman\n\nthe dog,a dog,a cat\n')
    triples = data.load_training_data(path, "sup")
    assert triples.column_names == ("sent0", "sent1", "hard_neg") and triples.skipped_empty == 1
    assert triples.columns[0] == ("a man, smiling", "the dog")
    pairs = data.load_training_data(path, "sup", hard_negatives=False)
    assert pairs.column_names == ("sent0", "sent1")
    # contrastive without a label column: each triple -> (anchor, positive, 1) and (anchor, negative, 0).
    for objective in ("contrastive", "cosine"):
        labelled = data.load_training_data(path, objective)
        assert labelled.columns[1] == ("a man", "a dog", "a woman", "a cat")
        assert labelled.labels == (1.0, 1.0, 0.0, 0.0)

    plain = tmp_path / "pairs.csv"
    plain.write_text("sent0,sent1\na,b\nc,d\n")
    assert data.load_training_data(plain, "sup").column_names == ("sent0", "sent1")
    with pytest.raises(data.DataError, match=r"pairs.csv:1: header .* lacks column\(s\) hard_neg"):
        data.load_training_data(plain, "triplet")


def test_supcon_reads_class_ids(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text("sent0,sent1,label,hard_neg\na,b,0,x\nc,d,12,y\n")
    pairs = data.load_training_data(path, "supcon")
    assert pairs.column_names == ("sent0", "sent1") and pairs.labels == (0.0, 12.0)
    for bad, problem in (("1.5", "not a class id"), ("-1", "not a class id"), ("cat", "not a class id")):
        path.write_text(f"sent0,sent1,label\na,b,0\nc,d,{bad}\n")
        with pytest.raises(data.DataError, match=rf"classes.csv:3: label '{bad}' is {problem}"):
            data.load_training_data(path, "supcon")
    path.write_text("sent0,sent1\na,b\n")
    with pytest.raises(data.DataError, match=r"lacks column\(s\) label \(the class id\)"):
        data.load_training_data(path, "supcon")


def test_malformed_csv_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("sent0,sent1,hard_neg\na,b,c\nd,e\n")
    with pytest.raises(data.DataError, match=r"bad.csv:3: expected 3 fields .* found 2"):
        data.load_training_data(path, "sup")
    quoted = tmp_path / "quote.csv"
    quoted.write_text('sent0,sent1\na,b\n"unterminated" x,b\n')
    with pytest.raises(data.DataError, match=r"quote.csv:3: malformed CSV"):
        data.load_training_data(quoted, "sup")
    empty = tmp_path / "empty.csv"
    empty.write_text("sent0,sent1,hard_neg\na,b,\n")
    with pytest.raises(data.DataError, match=r"empty.csv:2: empty hard_neg; pass --hard_negatives=false"):
        data.load_training_data(empty, "sup")
    label = tmp_path / "label.csv"
    label.write_text("sent0,sent1,label\na,b,yes\n")
    with pytest.raises(data.DataError, match=r"label.csv:2: label 'yes' is not a number"):
        data.load_training_data(label, "contrastive")


def test_wrong_format_for_objective(tmp_path):
    (tmp_path / "x.csv").write_text("sent0,sent1\na,b\n")
    with pytest.raises(data.DataError, match="one sentence per line"):
        data.load_training_data(tmp_path / "x.csv", "unsup")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_training_data(tmp_path / "missing.txt", "unsup")


def test_sts_reader(tmp_path):
    path = tmp_path / "sick.tsv"
    path.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                    '1\t"A man\tA person\t4.5\tENTAILMENT\n2\tA dog\tA cat\t1.5\tNEUTRAL\n\n')
    sts = data.read_sts(path)
    assert sts.sentences1 == ('"A man', "A dog") and sts.scores == (4.5, 1.5)
    bad = tmp_path / "bad.tsv"
    bad.write_text("score\tsentence1\tsentence2\n4\ta\tb\n3\tc\n")
    with pytest.raises(data.DataError, match=r"bad.tsv:3: expected 3 tab-separated fields"):
        data.read_sts(bad)
    with pytest.raises(data.DataError, match="needs a score column"):
        (tmp_path / "h.tsv").write_text("a\tb\n1\t2\n")
        data.read_sts(tmp_path / "h.tsv")


def test_batch_order_is_a_function_of_seed_and_step():
    first_epoch = [i for step in range(3) for i in data.batch_indices(10, 3, seed=1, step=step)]
    assert len(set(first_epoch)) == 9  # one epoch: no repeats, the partial batch dropped
    assert data.batch_indices(10, 3, seed=1, step=4) == data.batch_indices(10, 3, seed=1, step=4)
    assert data.batch_indices(10, 3, seed=1, step=3) != data.batch_indices(10, 3, seed=1, step=0)

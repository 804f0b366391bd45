"""Sources, bad input, the tokenizer (Korean round trip) and the prepare_data CLI."""

import json
import logging
import pathlib

import numpy as np
import pytest

from gemma2_jax.cli import prepare_data
from gemma2_jax.data import (
  BOS_ID,
  EOS_ID,
  STATS,
  DataConfig,
  DataError,
  SourceConfig,
  Tokenizer,
  make_eval_iterator,
  make_train_iterator,
  open_source,
  prepare,
  train_tokenizer,
)

DATA = pathlib.Path(__file__).parent / "data"
TOK = str(DATA / "ko_sp1024.model")
KO_FILES = sorted((DATA / "ko").glob("*.txt"))


def _cfg(paths, fmt="auto", **kw):
  src = dict(paths=paths, format=fmt)
  for k in ("text_field", "doc_per"):
    if k in kw:
      src[k] = kw.pop(k)
  return DataConfig(sources=[SourceConfig(**src)], **dict(dict(seq_len=32, global_batch=2), **kw))


def _all_docs(cfg) -> list[list[int]]:
  """Documents (ids without <bos>/<eos>) in corpus order, via the eval iterator."""
  rows = []
  for b in make_eval_iterator(cfg, tokenizer_path=TOK):
    full = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
    keep = np.concatenate([b["segment_ids"] != 0, full[:, -1:] != 0], axis=1)
    rows.extend(full[r][keep[r]] for r in range(len(full)))
  stream = np.concatenate(rows).tolist()
  docs, cur = [], None
  for t in stream:
    if t == BOS_ID:
      cur = []
    elif t == EOS_ID:
      docs.append(cur)
    else:
      cur.append(t)
  return docs


# --- Korean / tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", KO_FILES[:3], ids=lambda p: p.name)
def test_hangul_round_trips_byte_exactly(path):
  tok = Tokenizer(TOK)
  text = path.read_text(encoding="utf-8")
  ids = tok.encode(text)
  assert tok.decode(ids).encode("utf-8") == text.encode("utf-8")
  # pieces account for every byte (what bits-per-byte divides by)
  assert tok.piece_bytes()[ids].sum() == len(text.encode("utf-8"))
  # characters outside the tiny vocab fall back to bytes rather than <unk>
  odd = "훈민정음 뷁 똠방각하 😀 ğ"
  assert tok.decode(tok.encode(odd)) == odd
  assert 3 not in tok.encode(odd)


def test_train_tokenizer_uses_gemma_ids(tmp_path):
  path = train_tokenizer([str(p) for p in KO_FILES], str(tmp_path / "sp"), vocab_size=800)
  tok = Tokenizer(path)
  tok.check(800)
  assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
  text = KO_FILES[0].read_text(encoding="utf-8")
  assert tok.decode(tok.encode(text)) == text


def test_tokenizer_vocab_mismatch_is_a_startup_error(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("가나다\n")
  with pytest.raises(DataError, match="has 1024 pieces but the model's vocab_size is 512"):
    make_train_iterator(_cfg(str(p)), tokenizer_path=TOK, vocab_size=512)
  with pytest.raises(DataError, match="num_real_tokens=1000"):
    make_train_iterator(_cfg(str(p)), tokenizer_path=TOK, vocab_size=1024, num_real_tokens=1000)
  # a padded embedding (Gemma: 256000 pieces, 256128 rows) is fine
  make_train_iterator(_cfg(str(p)), tokenizer_path=TOK, vocab_size=1152)
  with pytest.raises(DataError, match="vocab_size is 256128: more than 256 padding rows"):
    make_train_iterator(_cfg(str(p)), tokenizer_path=TOK, vocab_size=256128)
  with pytest.raises(DataError, match="tokenizer model not found"):
    make_train_iterator(_cfg(str(p)), tokenizer_path=str(tmp_path / "nope.model"))


def test_non_gemma_special_ids_are_rejected(tmp_path):
  import sentencepiece as spm

  spm.SentencePieceTrainer.Train(input=",".join(map(str, KO_FILES)),
                                 model_prefix=str(tmp_path / "m"), vocab_size=800, minloglevel=2,
                                 character_coverage=0.98)
  with pytest.raises(DataError, match="special ids pad/eos/bos/unk"):
    Tokenizer(tmp_path / "m.model").check(1024)


# --- formats ----------------------------------------------------------------------------------------


def test_formats_agree(tmp_path):
  docs = ["첫 번째 문서입니다.", "두 번째 문서.\t탭과 \"따옴표\"", "세 번째: English mixed 123"]
  tok = Tokenizer(TOK)
  want = [tok.encode(d) for d in docs]
  (tmp_path / "d.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
  (tmp_path / "d.jsonl").write_text(
      "".join(json.dumps({"text": d, "meta": 1}, ensure_ascii=False) + "\n" for d in docs),
      encoding="utf-8")
  for i, d in enumerate(docs):
    (tmp_path / f"f{i}.txt").write_text(d, encoding="utf-8")
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"body": docs, "n": [1, 2, 3]}), tmp_path / "d.parquet",
                 row_group_size=2)
  assert _all_docs(_cfg(str(tmp_path / "d.txt"))) == want
  assert _all_docs(_cfg(str(tmp_path / "d.jsonl"))) == want
  assert _all_docs(_cfg(str(tmp_path / "f*.txt"), doc_per="file")) == want
  assert _all_docs(_cfg(str(tmp_path / "d.parquet"), text_field="body")) == want
  summary = prepare.tokenize_corpus(SourceConfig(paths=(str(tmp_path / "d.jsonl"),)), TOK,
                                    str(tmp_path / "prep"), num_workers=1, progress=False)
  assert summary.documents == 3
  assert _all_docs(_cfg(str(tmp_path / "prep" / "*.array_record*"), "arrayrecord")) == want


def test_crlf_and_blank_lines(tmp_path):
  p = tmp_path / "w.txt"
  p.write_bytes("하나\r\n\r\n   \n둘\r\n".encode())
  tok = Tokenizer(TOK)
  assert _all_docs(_cfg(str(p))) == [tok.encode("하나"), tok.encode("둘")]


def test_tfds_missing_dataset_is_one_line(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  sc = SourceConfig(format="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError, match="cannot open TFDS 'no_such_dataset_xyz'") as e:
    open_source(sc)
  assert "\n" not in str(e.value)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_path_and_empty_glob(tmp_path):
  with pytest.raises(DataError, match="path does not exist: .*nope.jsonl"):
    make_train_iterator(_cfg(str(tmp_path / "nope.jsonl")), tokenizer_path=TOK)
  with pytest.raises(DataError, match=r"no files match glob: .*\*.jsonl"):
    make_train_iterator(_cfg(str(tmp_path / "*.jsonl")), tokenizer_path=TOK)


def test_empty_corpus(tmp_path):
  (tmp_path / "e.txt").write_text("\n\n\n")
  with pytest.raises(DataError, match="empty corpus"):
    make_train_iterator(_cfg(str(tmp_path / "e.txt")), tokenizer_path=TOK)
  (tmp_path / "z.jsonl").write_text("")
  with pytest.raises(DataError, match="empty corpus"):
    make_train_iterator(_cfg(str(tmp_path / "z.jsonl")), tokenizer_path=TOK)


def test_invalid_utf8_replace_or_fail(tmp_path, caplog):
  p = tmp_path / "u.txt"
  p.write_bytes("좋은 줄\n".encode() + b"bad \xff\xfe byte \xed\x95\n" + "끝\n".encode())
  STATS.clear()
  with caplog.at_level(logging.WARNING):
    docs = _all_docs(_cfg(str(p)))
  tok = Tokenizer(TOK)
  assert tok.decode(docs[1]) == "bad \ufffd\ufffd byte \ufffd"
  assert STATS["bad_utf8"] == 1
  assert f"{p}:2: invalid UTF-8" in caplog.text
  with pytest.raises(DataError, match=f"{p}:2: invalid UTF-8 at byte 4"):
    next(make_eval_iterator(_cfg(str(p), bad_utf8="fail"), tokenizer_path=TOK))


def test_malformed_jsonl_and_missing_field(tmp_path, caplog):
  p = tmp_path / "m.jsonl"
  p.write_text('{"text": "하나"}\n{"text": "둘"\n\n{"body": "셋"}\n[1, 2]\n{"text": 5}\n'
               '{"text": "넷"}\n', encoding="utf-8")
  STATS.clear()
  with caplog.at_level(logging.WARNING):
    docs = _all_docs(_cfg(str(p)))
  tok = Tokenizer(TOK)
  assert [tok.decode(d) for d in docs] == ["하나", "넷"]
  assert STATS["bad_records"] == 4
  assert f"{p}:2: malformed JSON" in caplog.text
  assert f"{p}:4: missing text field 'text' (has ['body'])" in caplog.text
  with pytest.raises(DataError, match=f"{p}:2: malformed JSON"):
    next(make_eval_iterator(_cfg(str(p), bad_records="fail"), tokenizer_path=TOK))
  q = tmp_path / "f.jsonl"
  q.write_text('{"body": "x"}\n', encoding="utf-8")
  with pytest.raises(DataError, match=f"{q}:1: missing text field 'text'"):
    next(make_eval_iterator(_cfg(str(q), bad_records="fail"), tokenizer_path=TOK))


def test_invalid_utf8_inside_jsonl(tmp_path):
  p = tmp_path / "u.jsonl"
  p.write_bytes(b'{"text": "ok \xff"}\n' + '{"text": "한국어"}\n'.encode())
  tok = Tokenizer(TOK)
  assert [tok.decode(d) for d in _all_docs(_cfg(str(p)))] == ["ok \ufffd", "한국어"]
  with pytest.raises(DataError, match=f"{p}:1: invalid UTF-8"):
    next(make_eval_iterator(_cfg(str(p), bad_utf8="fail"), tokenizer_path=TOK))


def test_all_documents_skipped_is_an_error_not_a_hang(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text("not json\n" * 20)
  with pytest.raises(DataError, match="every document of a whole epoch was empty or skipped"):
    next(make_train_iterator(_cfg(str(p), tokenize_batch=4), tokenizer_path=TOK))


def test_parquet_missing_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"body": ["가"]}), tmp_path / "d.parquet")
  with pytest.raises(DataError, match=r"d.parquet: no column 'text' \(columns: \['body'\]\)"):
    make_train_iterator(_cfg(str(tmp_path / "d.parquet")), tokenizer_path=TOK)


def test_long_documents_split_truncate_or_fail(tmp_path):
  text = KO_FILES[0].read_text(encoding="utf-8").replace("\n", " ")[:3000]
  p = tmp_path / "long.txt"
  p.write_text(text + "\n" + "짧은 문서\n", encoding="utf-8")
  tok = Tokenizer(TOK)
  ids = tok.encode(text)
  assert len(ids) > 100
  # split: nothing lost, whatever the row length
  assert _all_docs(_cfg(str(p), seq_len=16)) == [ids, tok.encode("짧은 문서")]
  b = next(make_eval_iterator(_cfg(str(p), seq_len=16, long_docs="truncate", global_batch=1),
                              tokenizer_path=TOK))
  assert b["tokens"][0, 0] == BOS_ID and list(b["tokens"][0, 1:]) == ids[:15]
  b2 = next(make_eval_iterator(_cfg(str(p), seq_len=16, long_docs="truncate", global_batch=2),
                               tokenizer_path=TOK))
  assert b2["tokens"][1, 0] == BOS_ID  # the next row starts with the next document
  with pytest.raises(DataError, match="a document of .* tokens is longer than a row of 17"):
    next(make_eval_iterator(_cfg(str(p), seq_len=16, long_docs="error"), tokenizer_path=TOK))


def test_config_errors(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("가\n나\n")
  with pytest.raises(DataError, match="global_batch 3 is not divisible by process_count 2"):
    make_train_iterator(_cfg(str(p), global_batch=3), process_count=2, tokenizer_path=TOK)
  with pytest.raises(DataError, match="has 2 documents, fewer than the 4 processes"):
    make_train_iterator(_cfg(str(p), global_batch=4), process_index=3, process_count=4,
                        tokenizer_path=TOK)
  with pytest.raises(ValueError, match="long_docs"):
    _cfg(str(p), long_docs="drop")
  with pytest.raises(ValueError, match="source format"):
    SourceConfig(paths="x", format="csv")
  with pytest.raises(DataError, match="cannot infer format"):
    (tmp_path / "x.csv").write_text("a")
    make_train_iterator(_cfg(str(tmp_path / "x.csv")), tokenizer_path=TOK)


def test_prepared_shards_refuse_another_tokenizer(tmp_path):
  prepare.tokenize_corpus(SourceConfig(paths=(str(KO_FILES[1]),)), TOK, str(tmp_path / "prep"),
                          num_workers=1, progress=False)
  other = train_tokenizer([str(p) for p in KO_FILES], str(tmp_path / "sp"), vocab_size=800)
  cfg = _cfg(str(tmp_path / "prep" / "*.array_record*"), "arrayrecord")
  make_train_iterator(cfg, tokenizer_path=TOK)
  with pytest.raises(DataError, match="was tokenized with .*re-run prepare_data"):
    make_train_iterator(cfg, tokenizer_path=other)


# --- prepare_data CLI -------------------------------------------------------------------------------


def test_prepare_cli_parallel_with_summary(tmp_path, capsys):
  out = tmp_path / "prep"
  rc = prepare_data.main(["tokenize", "--input", str(DATA / "ko" / "*.txt"), "--tokenizer", TOK,
                          "--output_dir", str(out), "--num_workers", "2", "--num_shards", "3",
                          "--no_progress"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "bytes/token" in printed and "chars/token" in printed
  meta = json.loads((out / "meta.json").read_text())
  assert len(meta["shards"]) == 3
  tok = Tokenizer(TOK)
  # split on "\n" only: str.splitlines also splits on U+2028 etc., which these files contain
  lines = [ln for p in KO_FILES for ln in p.read_text(encoding="utf-8").split("\n")
           if ln.strip()]
  assert meta["documents"] == len(lines)
  assert meta["tokens"] == sum(len(tok.encode(ln)) for ln in lines)
  assert meta["bytes"] == sum(len(ln.encode()) for ln in lines)
  docs = _all_docs(_cfg(str(out / "*.array_record*"), "arrayrecord"))
  assert docs == [tok.encode(ln) for ln in lines]  # shards keep corpus order


def test_prepare_cli_errors_are_one_line(tmp_path, capsys):
  rc = prepare_data.main(["tokenize", "--input", str(tmp_path / "*.jsonl"), "--tokenizer", TOK,
                          "--output_dir", str(tmp_path / "o"), "--no_progress"])
  assert rc == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no files match glob") and err.count("\n") == 1


def test_prepare_cli_trains_tokenizer_from_jsonl(tmp_path, capsys):
  p = tmp_path / "c.jsonl"
  with open(p, "w", encoding="utf-8") as f:
    for path in KO_FILES:
      for ln in path.read_text(encoding="utf-8").splitlines():
        if ln.strip():
          f.write(json.dumps({"text": ln}, ensure_ascii=False) + "\n")
  rc = prepare_data.main(["train-tokenizer", "--input", str(p), "--model_prefix",
                          str(tmp_path / "sp"), "--vocab_size", "800"])
  assert rc == 0
  Tokenizer(tmp_path / "sp.model").check(800)


def test_tfds_source_reads_text_feature(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  records = [{"text": "첫째 문서".encode()}, {"text": np.array("둘째".encode(), dtype=object)}]
  calls = {}

  def fake_data_source(name, *, split, data_dir, download):
    calls.update(name=name, split=split, data_dir=data_dir, download=download)
    return records

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  sc = SourceConfig(format="tfds", tfds_name="ko_wiki", tfds_split="train[:10]",
                    tfds_data_dir="/data/tfds")
  src = open_source(sc)
  assert [src[0], src[1]] == ["첫째 문서", "둘째"]
  assert calls == dict(name="ko_wiki", split="train[:10]", data_dir="/data/tfds", download=False)
  cfg = DataConfig(sources=[sc], seq_len=16, global_batch=1)
  tok = Tokenizer(TOK)
  assert _all_docs(cfg) == [tok.encode("첫째 문서"), tok.encode("둘째")]

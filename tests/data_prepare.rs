//! `tessera data prepare` on good and malformed inputs. What the user sees (exit code 2, a message on stderr
//! naming the file and line) goes through the real binary; what ends up in the shards goes through
//! `tessera::data::prepare` and is read back with `TokenShards`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera::data::prepare::DEFAULT_SHARD_TOKENS;
use tessera::data::{prepare, DataError, PrepareOptions, ShardIndex, TokenShards, Tokenizer, TokenizerKind};

const EOT_TEXT: &str = "<|endoftext|>";

fn options(inputs: &[&Path], out: &Path, tokenizer: TokenizerKind) -> PrepareOptions {
    PrepareOptions {
        inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
        out: out.to_path_buf(),
        tokenizer,
        shard_tokens: DEFAULT_SHARD_TOKENS,
        skip_bad: false,
        extensions: None,
        force: false,
        progress: false,
    }
}

/// Writes `contents` to `dir/rel`, creating parent directories, and returns the path.
fn write(dir: &Path, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, contents).unwrap();
    path
}

/// Every token of the prepared corpus in `dir`, read through the verified reader.
fn read_all(dir: &Path) -> Vec<u32> {
    let shards = TokenShards::open(dir).unwrap_or_else(|e| panic!("cannot open {}: {e}", dir.display()));
    let mut out = vec![0i64; shards.total_tokens() as usize];
    shards.read(0, &mut out).unwrap();
    out.into_iter().map(|t| u32::try_from(t).unwrap()).collect()
}

/// The error `TokenShards::open` gives for `dir` (`TokenShards` has no `Debug`, so no `unwrap_err`).
fn open_error(dir: &Path) -> DataError {
    match TokenShards::open(dir) {
        Ok(_) => panic!("{} opened without error", dir.display()),
        Err(e) => e,
    }
}

/// What prepare must produce for `docs`: each document's tokens followed by end-of-text.
fn expected_stream(tok: &Tokenizer, docs: &[&str]) -> Vec<u32> {
    let mut want = vec![];
    for d in docs {
        want.extend(tok.encode(d).unwrap());
        want.push(tok.eot());
    }
    want
}

fn tessera(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).current_dir(cwd).output().expect("tessera runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run exited with 2, printed one `error:` message containing every one of `needles`, and
/// left no `index.json` in `out`.
fn assert_input_error(o: &Output, needles: &[&str], out: &Path) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}: {err}");
    }
    assert!(!out.join("index.json").exists(), "a failed prepare left an index in {}", out.display());
}

// ---- content ----

/// Text files, a directory read recursively in name order, and JSON Lines; blank JSON lines are not documents.
fn mixed_inputs(root: &Path) -> (Vec<PathBuf>, Vec<&'static str>) {
    let single = write(root, "single.txt", "Hello world.\nA second line, with a tab\tand é.");
    // Created out of name order, so only sorting gives the expected order.
    let dir = root.join("docs");
    write(&dir, "n.txt", "enn");
    write(&dir, "m/inner.txt", "inside m");
    write(&dir, "a.txt", "ay <|endoftext|> is plain text here");
    write(&dir, "m/deeper/z.txt", "deep zed");
    let jsonl = write(
        root,
        "corpus.jsonl",
        "{\"text\": \"first json doc\"}\n\n   \n{\"text\": \"second \\\"quoted\\\" doc\\nwith a newline 🚀\", \"id\": 7}\r\n",
    );
    let docs = vec![
        "Hello world.\nA second line, with a tab\tand é.",
        "ay <|endoftext|> is plain text here",
        "deep zed",
        "inside m",
        "enn",
        "first json doc",
        "second \"quoted\" doc\nwith a newline 🚀",
    ];
    (vec![single, dir, jsonl], docs)
}

fn check_mixed_inputs(kind: TokenizerKind) {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, docs) = mixed_inputs(tmp.path());
    let out = tmp.path().join("out");
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let index = prepare(&options(&inputs, &out, kind)).unwrap();

    let tok = Tokenizer::new(kind);
    let want = expected_stream(&tok, &docs);
    let doc_tokens: u64 = docs.iter().map(|d| tok.encode(d).unwrap().len() as u64).sum();
    assert_eq!(index.documents, docs.len() as u64);
    assert_eq!(index.total_tokens, doc_tokens + docs.len() as u64, "document tokens plus one end-of-text each");
    assert_eq!(index.tokenizer, kind);
    assert_eq!(index.vocab_size, tok.vocab_size());
    assert_eq!(index.eot_token, tok.eot());
    assert!(index.skipped.is_empty());
    assert_eq!(ShardIndex::load(&out).unwrap(), index, "index.json holds what prepare returned");

    let got = read_all(&out);
    assert_eq!(got, want, "the token stream is the documents in order, each followed by end-of-text");
    // Only the separators are end-of-text tokens, even where a document spells `<|endoftext|>`.
    assert_eq!(got.iter().filter(|&&t| t == tok.eot()).count(), docs.len());
    let mut joined = docs.join(EOT_TEXT);
    joined.push_str(EOT_TEXT);
    assert_eq!(tok.decode(&got), joined);
}

#[test]
fn files_directories_and_jsonl_decode_back_to_documents_joined_by_end_of_text_with_gpt2() {
    check_mixed_inputs(TokenizerKind::Gpt2);
}

#[test]
fn files_directories_and_jsonl_decode_back_to_documents_joined_by_end_of_text_with_bytes() {
    check_mixed_inputs(TokenizerKind::Byte);
}

#[test]
fn inputs_are_read_in_the_order_given_not_sorted() {
    let tmp = tempfile::tempdir().unwrap();
    let b = write(tmp.path(), "b.txt", "bee");
    let a = write(tmp.path(), "a.txt", "ay");
    let out = tmp.path().join("out");
    prepare(&options(&[&b, &a], &out, TokenizerKind::Byte)).unwrap();
    assert_eq!(read_all(&out), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &["bee", "ay"]));
}

#[test]
fn empty_files_and_empty_json_texts_add_no_document() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = write(tmp.path(), "empty.txt", "");
    let full = write(tmp.path(), "full.txt", "content");
    let jsonl = write(tmp.path(), "e.jsonl", "{\"text\": \"\"}\n{\"text\": \"x\"}\n");
    let out = tmp.path().join("out");
    let index = prepare(&options(&[&empty, &full, &jsonl], &out, TokenizerKind::Byte)).unwrap();
    assert_eq!(index.documents, 2);
    assert_eq!(read_all(&out), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &["content", "x"]));
}

#[test]
fn small_shard_tokens_give_bounded_shards_whose_concatenation_is_the_same_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, _) = mixed_inputs(tmp.path());
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    for kind in [TokenizerKind::Byte, TokenizerKind::Gpt2] {
        let whole = tmp.path().join(format!("whole-{kind:?}"));
        let split = tmp.path().join(format!("split-{kind:?}"));
        let one = prepare(&options(&inputs, &whole, kind)).unwrap();
        let many = prepare(&PrepareOptions { shard_tokens: 7, ..options(&inputs, &split, kind) }).unwrap();
        assert_eq!(one.shards.len(), 1);

        let total = many.total_tokens;
        assert_eq!(total, one.total_tokens);
        assert_eq!(many.documents, one.documents);
        assert_eq!(many.shards.len() as u64, total.div_ceil(7), "{kind:?}");
        for (i, s) in many.shards.iter().enumerate() {
            assert_eq!(s.file, format!("shard-{i:05}.bin"));
            let last = i + 1 == many.shards.len();
            if last {
                assert!((1..=7).contains(&s.tokens), "last shard has {} tokens", s.tokens);
            } else {
                assert_eq!(s.tokens, 7, "shard {i} is not full");
            }
            // The file is the raw u16 stream, and the index's checksum is the xxh3 of its bytes.
            let bytes = std::fs::read(split.join(&s.file)).unwrap();
            assert_eq!(bytes.len() as u64, s.tokens * 2);
            assert_eq!(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)), s.xxh3, "{}", s.file);
        }

        // The shard files, concatenated raw, are the single-shard corpus.
        let raw: Vec<u8> = many.shards.iter().flat_map(|s| std::fs::read(split.join(&s.file)).unwrap()).collect();
        assert_eq!(raw, std::fs::read(whole.join("shard-00000.bin")).unwrap());
        let stream = read_all(&whole);
        assert_eq!(read_all(&split), stream, "{kind:?}");

        // Reads that straddle shard boundaries agree with the single-shard corpus.
        let shards = TokenShards::open(&split).unwrap();
        let mut window = vec![0i64; 16];
        shards.read(5, &mut window).unwrap();
        assert_eq!(window, stream[5..21].iter().map(|&t| t as i64).collect::<Vec<_>>());
        assert_eq!(shards.locate(7), (1, 0));
        assert_eq!(shards.locate(total - 1), (many.shards.len() - 1, (total - 1) % 7));
    }
}

#[test]
fn directory_with_ext_filter_takes_only_matching_files_but_named_files_always() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("src");
    write(&dir, "a.py", "print('a')");
    write(&dir, "b.txt", "not python");
    write(&dir, "sub/c.py", "print('c')");
    write(&dir, "sub/d.pyc", "\u{1}compiled");
    write(&dir, "e", "no extension");
    write(&dir, "f.py.bak", "backup");
    let named = write(tmp.path(), "notes.txt", "named explicitly");
    let out = tmp.path().join("out");
    let index = prepare(&PrepareOptions {
        extensions: Some(vec!["py".into()]),
        ..options(&[&dir, &named], &out, TokenizerKind::Byte)
    })
    .unwrap();
    assert_eq!(index.documents, 3);
    let want = ["print('a')", "print('c')", "named explicitly"];
    assert_eq!(read_all(&out), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &want));

    // `--ext py` through the binary does the same (a leading dot is accepted too).
    let o = tessera(
        &["data", "prepare", "--input", "src", "--out", "cli", "--tokenizer", "byte", "--ext", ".py"],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_all(&tmp.path().join("cli")), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &want[..2]));
}

// ---- bad input, as the user sees it ----

#[test]
fn missing_input_path_exits_2_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "good.txt", "good");
    let o =
        tessera(&["data", "prepare", "--input", "good.txt", "--input", "no/such/file.txt", "--out", "out"], tmp.path());
    assert_input_error(&o, &["no/such/file.txt", "does not exist"], &tmp.path().join("out"));

    let missing = tmp.path().join("gone");
    match prepare(&options(&[&missing], &tmp.path().join("out2"), TokenizerKind::Byte)) {
        Err(DataError::MissingInput { path }) => assert_eq!(path, missing),
        other => panic!("expected MissingInput, got {other:?}"),
    }
}

#[test]
fn invalid_utf8_on_line_3_exits_2_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "good.txt", "fine");
    write(tmp.path(), "bad.txt", b"line one\nline two\nline \xff three\nline four\n");
    let o = tessera(&["data", "prepare", "--input", "good.txt", "--input", "bad.txt", "--out", "out"], tmp.path());
    assert_input_error(&o, &["bad.txt:3:", "UTF-8", "--skip-bad"], &tmp.path().join("out"));
    let err = stderr(&o);
    assert!(err.find("error: ") < err.find("hint: rerun with --skip-bad"), "the error first, then what to do: {err}");
}

#[test]
fn invalid_utf8_inside_a_jsonl_line_names_that_line() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "c.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": \"b\xc3\"}\n");
    match prepare(&options(&[&f], &tmp.path().join("out"), TokenizerKind::Gpt2)) {
        Err(DataError::InvalidUtf8 { path, line }) => assert_eq!((path, line), (f, 3)),
        other => panic!("expected InvalidUtf8, got {other:?}"),
    }
}

#[test]
fn malformed_json_line_exits_2_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "corpus.jsonl", "{\"text\": \"one\"}\n{\"text\": \"unterminated\n{\"text\": \"three\"}\n");
    let o = tessera(&["data", "prepare", "--input", "corpus.jsonl", "--out", "out"], tmp.path());
    assert_input_error(&o, &["corpus.jsonl:2:", "malformed JSON"], &tmp.path().join("out"));
}

#[test]
fn json_line_without_text_or_with_non_string_text_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"body\": \"x\"}", "no \"text\" field"),
        ("{\"text\": 5}", "a number"),
        ("{\"text\": null}", "null"),
        ("{\"text\": [\"a\"]}", "an array"),
        ("[\"text\"]", "no \"text\" field"),
        ("\"just a string\"", "no \"text\" field"),
    ];
    for (i, (line2, why)) in cases.iter().enumerate() {
        let f = write(tmp.path(), &format!("c{i}.jsonl"), format!("{{\"text\": \"fine\"}}\n{line2}\n"));
        match prepare(&options(&[&f], &tmp.path().join(format!("out{i}")), TokenizerKind::Gpt2)) {
            Err(e @ DataError::MalformedJsonLine { .. }) => {
                let DataError::MalformedJsonLine { ref path, line, ref reason } = e else { unreachable!() };
                assert_eq!((path, line), (&f, 2), "{line2}");
                assert!(reason.contains(why), "{line2}: {reason}");
                assert!(e.to_string().contains(&format!("c{i}.jsonl:2:")), "{e}");
            }
            other => panic!("{line2}: expected MalformedJsonLine, got {other:?}"),
        }
    }

    // And through the binary: exit 2, file and line on stderr.
    write(tmp.path(), "notext.jsonl", "{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n");
    let o = tessera(&["data", "prepare", "--input", "notext.jsonl", "--out", "cli"], tmp.path());
    assert_input_error(&o, &["notext.jsonl:2:", "\"text\""], &tmp.path().join("cli"));
}

#[test]
fn nul_byte_with_the_byte_tokenizer_exits_2_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "bin.dat", b"looks like text\nuntil \0 here\n");
    let o = tessera(&["data", "prepare", "--input", "bin.dat", "--out", "out", "--tokenizer", "byte"], tmp.path());
    assert_input_error(&o, &["bin.dat:2:", "NUL"], &tmp.path().join("out"));

    // A NUL inside a JSON string is caught the same way, on its line.
    let f = write(tmp.path(), "c.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"a\\u0000b\"}\n");
    match prepare(&options(&[&f], &tmp.path().join("out2"), TokenizerKind::Byte)) {
        Err(DataError::NotText { path, line }) => assert_eq!((path, line), (f, 3)),
        other => panic!("expected NotText, got {other:?}"),
    }
}

#[test]
fn corpus_of_only_empty_files_exits_2_saying_there_is_nothing_to_train_on() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "in/a.txt", "");
    write(tmp.path(), "in/b.txt", "");
    write(tmp.path(), "in/c.jsonl", "\n\n");
    let o = tessera(&["data", "prepare", "--input", "in", "--out", "out"], tmp.path());
    assert_input_error(&o, &["no text found", "nothing to train on", "3 file(s)"], &tmp.path().join("out"));

    let inputs = tmp.path().join("in");
    match prepare(&options(&[&inputs], &tmp.path().join("out2"), TokenizerKind::Gpt2)) {
        Err(DataError::EmptyCorpus { inputs: i, files, skipped }) => {
            assert_eq!((i, files, skipped), (vec![inputs], 3, 0));
        }
        other => panic!("expected EmptyCorpus, got {other:?}"),
    }
    assert!(
        std::fs::read_dir(tmp.path().join("out2")).map(|d| d.count()).unwrap_or(0) == 0,
        "an empty corpus leaves no shards behind"
    );
}

#[test]
fn skip_bad_skips_and_records_bad_files_and_lines_and_keeps_the_good_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let good = write(tmp.path(), "good.txt", "good text");
    let bad_utf8 = write(tmp.path(), "bad.txt", b"one\ntwo\nth\xffree\n");
    let nul = write(tmp.path(), "nul.txt", b"a\nb\nc\n\0d");
    let jsonl = write(
        tmp.path(),
        "mixed.jsonl",
        "{\"text\": \"json one\"}\n{broken\n{\"no_text\": 1}\n{\"text\": \"json four\"}\n{\"text\": false}\n",
    );
    let out = tmp.path().join("out");
    let index = prepare(&PrepareOptions {
        skip_bad: true,
        ..options(&[&good, &bad_utf8, &nul, &jsonl], &out, TokenizerKind::Byte)
    })
    .unwrap();

    let want_docs = ["good text", "json one", "json four"];
    assert_eq!(index.documents, 3);
    assert_eq!(read_all(&out), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &want_docs));

    // Recorded in index.json on disk, with path and line.
    let on_disk = ShardIndex::load(&out).unwrap();
    let skipped: Vec<(String, Option<u64>)> = on_disk.skipped.iter().map(|s| (s.path.clone(), s.line)).collect();
    let p = |f: &Path| f.display().to_string();
    assert_eq!(
        skipped,
        vec![
            (p(&bad_utf8), Some(3)),
            (p(&nul), Some(4)),
            (p(&jsonl), Some(2)),
            (p(&jsonl), Some(3)),
            (p(&jsonl), Some(5)),
        ]
    );
    assert!(on_disk.skipped[0].reason.contains("UTF-8"), "{}", on_disk.skipped[0].reason);
    assert!(on_disk.skipped[1].reason.contains("NUL"), "{}", on_disk.skipped[1].reason);
    assert!(on_disk.skipped[4].reason.contains("a boolean"), "{}", on_disk.skipped[4].reason);
    assert_eq!(on_disk.skipped, index.skipped);

    // The binary says so.
    let o = tessera(
        &["data", "prepare", "--input", "good.txt", "bad.txt", "--out", "cli", "--tokenizer", "byte", "--skip-bad"],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("prepared 1 documents"), "{stdout}");
    assert!(stdout.contains("skipped 1 bad input"), "{stdout}");
    assert!(stdout.contains("bad.txt:3"), "{stdout}");
}

#[test]
fn skip_bad_with_nothing_good_left_is_still_an_empty_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = write(tmp.path(), "bad.txt", b"\xfe\xff");
    match prepare(&PrepareOptions { skip_bad: true, ..options(&[&bad], &tmp.path().join("out"), TokenizerKind::Gpt2) })
    {
        Err(DataError::EmptyCorpus { files, skipped, .. }) => assert_eq!((files, skipped), (1, 1)),
        other => panic!("expected EmptyCorpus, got {other:?}"),
    }
}

#[test]
fn preparing_into_a_prepared_directory_fails_suggesting_force_and_force_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "old.txt", "the old corpus, long enough for several shards");
    write(tmp.path(), "new.txt", "new");
    let out = tmp.path().join("out");
    let run = |args: &[&str]| {
        tessera(&[&["data", "prepare", "--out", "out", "--tokenizer", "byte"], args].concat(), tmp.path())
    };

    let first = run(&["--input", "old.txt", "--shard-tokens", "5"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let old_index = std::fs::read(out.join("index.json")).unwrap();
    let old_shards = ShardIndex::load(&out).unwrap().shards.len();
    assert!(old_shards > 2);
    write(&out, "notes.md", "the user's own file");

    let again = run(&["--input", "new.txt"]);
    let err = stderr(&again);
    assert_eq!(again.status.code(), Some(2), "{err}");
    assert!(err.contains("already holds a prepared corpus") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(out.join("index.json")).unwrap(), old_index, "the old corpus is untouched");

    let forced = run(&["--input", "new.txt", "--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    let index = ShardIndex::load(&out).unwrap();
    assert_eq!((index.documents, index.shards.len()), (1, 1));
    assert_eq!(read_all(&out), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &["new"]));
    for i in 1..old_shards {
        assert!(!out.join(format!("shard-{i:05}.bin")).exists(), "old shard {i} was left behind");
    }
    assert!(out.join("notes.md").exists(), "--force removes only the corpus's own files");
}

#[test]
fn preparing_into_an_existing_directory_without_a_corpus_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "a.txt", "text");
    let out = tmp.path().join("out");
    write(&out, "README", "unrelated");
    prepare(&options(&[&input], &out, TokenizerKind::Byte)).unwrap();
    assert_eq!(read_all(&out), expected_stream(&Tokenizer::new(TokenizerKind::Byte), &["text"]));
}

// ---- the reading side ----

/// A byte-tokenized corpus of several 7-token shards; returns its directory.
fn sharded_corpus(root: &Path) -> PathBuf {
    let input = write(root, "in.txt", "twenty-odd bytes of plain text");
    let out = root.join("corpus");
    let index = prepare(&PrepareOptions { shard_tokens: 7, ..options(&[&input], &out, TokenizerKind::Byte) }).unwrap();
    assert!(index.shards.len() >= 3);
    TokenShards::open(&out).expect("the intact corpus opens");
    out
}

#[test]
fn shard_truncated_by_one_byte_is_reported_as_corrupt_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    let shard = dir.join("shard-00001.bin");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len - 1).unwrap();
    match open_error(&dir) {
        e @ DataError::CorruptShard { .. } => {
            let DataError::CorruptShard { ref path, ref reason } = e else { unreachable!() };
            assert_eq!(path, &shard);
            assert!(reason.contains("13 bytes") && reason.contains("14"), "{reason}");
            assert!(e.to_string().contains("shard-00001.bin"), "{e}");
        }
        other => panic!("expected CorruptShard, got {other:?}"),
    }
}

#[test]
fn shard_with_one_byte_flipped_is_reported_as_corrupt_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    let shard = dir.join("shard-00002.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[3] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    // Opening reads no shard's bytes, so the checksum is checked by the first read that touches the shard.
    let shards = TokenShards::open(&dir).expect("the size is right, so the corpus opens");
    let mut out = vec![0i64; shards.total_tokens() as usize];
    match shards.read(0, &mut out) {
        Err(DataError::CorruptShard { path, reason }) => {
            assert_eq!(path, shard);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected CorruptShard, got {other:?}"),
    }
    assert!(out[14..].iter().all(|&t| t == 0), "no token of the corrupt shard (from token 14) was copied");
}

#[test]
fn deleted_shard_is_reported_as_missing_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    let shard = dir.join("shard-00000.bin");
    std::fs::remove_file(&shard).unwrap();
    match open_error(&dir) {
        e @ DataError::MissingShard { .. } => {
            assert!(matches!(&e, DataError::MissingShard { path } if path == &shard), "{e:?}");
            assert!(e.to_string().contains("shard-00000.bin"), "{e}");
        }
        other => panic!("expected MissingShard, got {other:?}"),
    }
}

#[test]
fn directory_without_an_index_is_reported_as_no_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    match open_error(tmp.path()) {
        DataError::MissingCorpus { dir } => assert_eq!(dir, tmp.path()),
        other => panic!("expected MissingCorpus, got {other:?}"),
    }
}

// ---- regressions: --force with the output inside an input directory, and a failed --force run ----

#[test]

fn force_into_an_output_directory_inside_the_input_directory_prepares_only_the_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write(&input, "a.txt", "hello there");
    let out = input.join("corpus");
    prepare(&options(&[&input], &out, TokenizerKind::Byte)).unwrap();
    let first = read_all(&out);
    prepare(&PrepareOptions { force: true, ..options(&[&input], &out, TokenizerKind::Byte) }).unwrap();
    assert_eq!(read_all(&out), first, "the old corpus's own files were read as input");
}

#[test]

fn failed_force_prepare_leaves_the_old_corpus_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let good = write(tmp.path(), "good.txt", "the old corpus");
    let bad = write(tmp.path(), "bad.jsonl", "{\"text\": \"x\"}\n{broken\n");
    let out = tmp.path().join("out");
    prepare(&options(&[&good], &out, TokenizerKind::Byte)).unwrap();
    let old = read_all(&out);
    assert!(prepare(&PrepareOptions { force: true, ..options(&[&bad], &out, TokenizerKind::Byte) }).is_err());
    assert_eq!(read_all(&out), old);
}

// ---- lazy verification: opening costs O(shards) metadata calls, each checksum is paid on first touch ----

#[test]
fn opening_verifies_no_checksum_and_a_corrupt_shard_fails_only_the_read_that_touches_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    let index = ShardIndex::load(&dir).unwrap();
    assert_eq!(index.shards.len(), 5, "31 tokens in shards of 7");
    let last = dir.join("shard-00004.bin");
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[3] ^= 0x01;
    std::fs::write(&last, &bytes).unwrap();

    let shards = std::sync::Arc::new(TokenShards::open(&dir).expect("a checksum mismatch does not fail the open"));
    assert_eq!(shards.verified(), 0, "opening hashed a shard");
    // Windows of 6 + 1 tokens: samples 0..4 lie in shards 0..=3, sample 4 (tokens 24..31) reaches shard 4.
    let (set, _) = tessera::data::SampleSet::split(shards.clone(), 6, 0.0).unwrap();
    assert_eq!(set.len, 5);
    let first = set.host_batch(&[0, 1]).unwrap();
    assert_eq!(first.ids, [0, 1]);
    assert_eq!(shards.verified(), 2, "the first batch verified the two shards it touched");
    set.host_batch(&[2, 3]).unwrap();
    set.host_batch(&[0, 1, 2, 3]).unwrap();
    assert_eq!(shards.verified(), 4, "each shard is verified once, on its first touch");

    for attempt in 0..2 {
        match set.host_batch(&[4]) {
            Err(e @ DataError::CorruptShard { .. }) => {
                assert!(
                    matches!(&e, DataError::CorruptShard { path, reason } if path == &last && reason.contains("checksum"))
                );
                assert!(e.to_string().contains("shard-00004.bin"), "{e}");
            }
            other => panic!("attempt {attempt}: expected CorruptShard, got {other:?}"),
        }
    }
    assert_eq!(shards.verified(), 4, "the corrupt shard was never accepted");
}

#[test]
fn a_token_outside_the_indexs_vocabulary_fails_the_read_naming_the_shard_and_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    // An index that claims a smaller vocabulary than its shards use ("plain text" bytes reach 120).
    let path = dir.join("index.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"vocab_size\": 256", "\"vocab_size\": 100");
    std::fs::write(&path, text).unwrap();
    let shards = std::sync::Arc::new(TokenShards::open(&dir).unwrap());
    let (set, _) = tessera::data::SampleSet::split(shards, 6, 0.0).unwrap();
    match set.host_batch(&[0]) {
        Err(e @ DataError::CorruptShard { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("shard-00000.bin") && msg.contains("outside the vocabulary of 100"), "{msg}");
        }
        other => panic!("expected CorruptShard, got {other:?}"),
    }
    // And an end-of-text id outside it is refused with the index.
    let text = std::fs::read_to_string(&path).unwrap().replace("\"vocab_size\": 100", "\"vocab_size\": 256");
    let eot = serde_json::from_str::<serde_json::Value>(&text).unwrap()["eot_token"].as_u64().unwrap();
    std::fs::write(&path, text.replace(&format!("\"eot_token\": {eot}"), "\"eot_token\": 999")).unwrap();
    assert!(matches!(open_error(&dir), DataError::BadIndex { reason, .. } if reason.contains("eot_token 999")));
}

#[test]
fn token_counts_too_large_for_any_file_are_refused_with_the_index_instead_of_overflowing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    let path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Two shards whose counts add up to total_tokens only modulo 2^64, the first too large for its bytes.
    index["shards"][0]["tokens"] = serde_json::json!(u64::MAX / 2 + 1);
    index["shards"][1]["tokens"] = serde_json::json!(u64::MAX / 2 + 1);
    std::fs::write(&path, serde_json::to_string(&index).unwrap()).unwrap();
    let e = open_error(&dir);
    assert!(matches!(&e, DataError::BadIndex { reason, .. } if reason.contains("more than any file holds")), "{e}");
}

#[test]
fn readers_on_several_threads_verify_each_shard_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_corpus(tmp.path());
    let shards = TokenShards::open(&dir).unwrap();
    let want = read_all(&dir);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut out = vec![0i64; shards.total_tokens() as usize];
                shards.read(0, &mut out).unwrap();
                assert_eq!(out, want.iter().map(|&t| t as i64).collect::<Vec<_>>());
            });
        }
    });
    assert_eq!(shards.verified(), shards.index.shards.len() as u64);
}

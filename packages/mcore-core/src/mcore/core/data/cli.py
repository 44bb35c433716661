"""``mcore data``: ``mcore data prepare INPUT... --output-prefix P`` tokenizes text into the
indexed format. Heavy imports wait for ``run``, so registering the command stays cheap."""

from __future__ import annotations

import argparse

from mcore.core.registry import CliCommand


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = sub.add_parser(
        "prepare",
        allow_abbrev=False,
        help="tokenize text or JSONL files into a Megatron .bin/.idx dataset",
        description=(
            "Tokenize INPUT files into PREFIX.bin and PREFIX.idx (Megatron-LM's indexed "
            "format). A .jsonl file holds one document per line; any other file is one "
            "document; a folder stands for its .py, .txt, .md and .jsonl files."
        ),
    )
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="text/JSONL files or folders")
    prepare.add_argument(
        "--output-prefix", required=True, metavar="P", help="write P.bin and P.idx"
    )
    prepare.add_argument(
        "--tokenizer", default=None, metavar="NAME", help="tokenizer registry name (byte, hf)"
    )
    prepare.add_argument(
        "--tokenizer-path", default=None, metavar="FILE", help="tokenizer.json for --tokenizer hf"
    )
    prepare.add_argument(
        "--train-bpe",
        type=int,
        default=None,
        metavar="VOCAB_SIZE",
        help="first train a byte-level BPE of this size on the inputs; saved as P.tokenizer.json",
    )
    prepare.add_argument(
        "--json-key", default="text", help="field holding the text in JSONL inputs (text)"
    )
    prepare.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD token"
    )


def _run(args: argparse.Namespace) -> int:
    from mcore.core.data.prepare import prepare

    done = prepare(
        args.inputs,
        args.output_prefix,
        tokenizer=args.tokenizer,
        tokenizer_path=args.tokenizer_path,
        train_bpe_vocab_size=args.train_bpe,
        json_key=args.json_key,
        append_eod=args.append_eod,
    )
    ds = done.dataset
    print(
        f"wrote {ds.prefix}.bin and {ds.prefix}.idx: {ds.num_documents} documents, "
        f"{ds.num_tokens} tokens ({ds.dtype.name}) from {done.num_files} files"
    )
    if done.tokenizer_path is not None:
        print(f"tokenizer: {done.tokenizer_path} (vocab size {done.tokenizer.vocab_size})")
    return 0


DATA = CliCommand(
    help="prepare training data (tokenize into Megatron's indexed format)",
    configure=_configure,
    run=_run,
)

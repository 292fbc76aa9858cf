"""The local model's OpenAI-compatible server: llama.cpp's own HTTP server, run in this
process by the xllamacpp package (a prebuilt wheel, nothing to compile).

    python local-model-server.py --model FILE.gguf --alias NAME --port PORT --n-ctx N --threads N

Started by scripts/local-model.sh, which owns the venv, the pid file and the waiting;
this file only maps its flags onto xllamacpp.CommonParams. The server answers under
http://127.0.0.1:PORT/v1 (models, chat completions with SSE streaming) until the process
is signalled.
"""

import argparse
import signal
import sys

import xllamacpp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the GGUF file")
    parser.add_argument("--alias", required=True, help="the model name clients ask for")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--n-ctx", required=True, type=int, help="context size in tokens")
    parser.add_argument("--threads", required=True, type=int, help="CPU threads for inference")
    args = parser.parse_args()

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    # A set of names: a plain string would be taken as one alias per character.
    params.model_alias = {args.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.n_ctx
    # One slot with the whole context: requests wait their turn instead of each getting a
    # slice of it or cutting off the one being answered, so three agents asked at once
    # all answer.
    params.n_parallel = 1
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads

    # Loads the model, then listens; requests are served by llama.cpp's own threads.
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", file=sys.stderr, flush=True)

    # SIGTERM and SIGINT end the process at once (their default action); until then this
    # thread just waits, keeping `server` alive.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())

"""The `chat`, `serve` and `feedback export` commands (typer). `register(app)` adds them to `alignkit`."""

from __future__ import annotations

from typing import Optional

import typer

from alignkit.serve.config import ServeConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Chat, serve and collect feedback.")
feedback_app = typer.Typer(no_args_is_help=True, help="Human feedback collected by `alignkit serve --feedback_db`.")
app.add_typer(feedback_app, name="feedback")

USER_ERRORS = (ValueError, FileNotFoundError)
DEFAULTS = ServeConfig()


def _fail(error: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _load(model_name_or_path: str, device: str):
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.serve.app import _device

    return load_causal_lm(model_name_or_path).to(_device(device)), load_tokenizer(model_name_or_path)


@app.command()
def chat(
    model_name_or_path: str = typer.Option("smollm2-135m-instruct", "--model_name_or_path"),
    system: str = typer.Option("", "--system", help="system message (change it in the chat with /system)"),
    max_new_tokens: int = typer.Option(256, "--max_new_tokens"),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(0.95, "--top_p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    context_length: int = typer.Option(0, "--context_length", help="token budget of a prompt + reply (0: the model's)"),
    history_strategy: str = typer.Option("truncate", "--history_strategy", help="truncate | summarize: what happens to old turns that do not fit"),
    summary_max_tokens: int = typer.Option(128, "--summary_max_tokens"),
    summarizer_model: str = typer.Option("", "--summarizer_model", help="model that writes summaries (default: the chat model)"),
    use_chat_template: str = typer.Option("auto", "--use_chat_template"),
    separator: str = typer.Option(DEFAULTS.separator, "--separator"),
    device: str = typer.Option("auto", "--device"),
):
    """Chat in the terminal with streamed replies (/reset, /system, /save FILE, /history)."""
    from alignkit.chat.terminal import ChatSettings, run_chat
    from alignkit.data.tokenize import Formatting
    from alignkit.serve.engine import Engine

    try:
        if history_strategy not in ("truncate", "summarize"):
            raise ValueError(f"--history_strategy must be truncate or summarize, got {history_strategy!r}")
        if max_new_tokens < 1 or not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise ValueError("need --max_new_tokens >= 1, 0 <= --temperature <= 2 and 0 < --top_p <= 1")
        model, tokenizer = _load(model_name_or_path, device)
        context = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        if max_new_tokens >= context:
            raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for the prompt in the context of {context} tokens")
        engine = Engine(model, tokenizer, max_batch_rows=8).start()
        summary_engine = Engine(*_load(summarizer_model, device)).start() if summarizer_model else None
        settings = ChatSettings(max_new_tokens, temperature, top_p, seed, context, history_strategy, summary_max_tokens)
        try:
            run_chat(engine, Formatting(use_chat_template, separator), settings, system=system, summary_engine=summary_engine)
        finally:
            engine.shutdown()
            if summary_engine:
                summary_engine.shutdown()
    except USER_ERRORS as error:
        _fail(error)


@app.command()
def serve(
    model_name_or_path: str = typer.Option(DEFAULTS.model_name_or_path, "--model_name_or_path"),
    host: str = typer.Option(DEFAULTS.host, "--host", help="a non-loopback address needs --api_key"),
    port: int = typer.Option(DEFAULTS.port, "--port"),
    api_key: str = typer.Option("", "--api_key", envvar="ALIGNKIT_API_KEY", help="require 'Authorization: Bearer KEY' (env ALIGNKIT_API_KEY)"),
    feedback_db: str = typer.Option("", "--feedback_db", help="SQLite file for the comparison view's judgments (off if empty)"),
    served_model_name: str = typer.Option("", "--served_model_name", help="the `model` id clients send (default: the model's name)"),
    context_length: int = typer.Option(0, "--context_length", help="prompt + reply budget in tokens (0: the model's)"),
    history_strategy: str = typer.Option("truncate", "--history_strategy", help="truncate | summarize, for conversations over the context"),
    summary_max_tokens: int = typer.Option(DEFAULTS.summary_max_tokens, "--summary_max_tokens"),
    summarizer_model: str = typer.Option("", "--summarizer_model", help="model that writes summaries (default: the served model)"),
    use_chat_template: str = typer.Option("auto", "--use_chat_template"),
    separator: str = typer.Option(DEFAULTS.separator, "--separator"),
    default_max_tokens: int = typer.Option(DEFAULTS.default_max_tokens, "--default_max_tokens", help="max_tokens when a request gives none"),
    max_tokens_limit: int = typer.Option(DEFAULTS.max_tokens_limit, "--max_tokens_limit", help="largest max_tokens a request may ask for"),
    max_n: int = typer.Option(DEFAULTS.max_n, "--max_n", help="largest n a request may ask for"),
    max_batch_rows: int = typer.Option(DEFAULTS.max_batch_rows, "--max_batch_rows", help="rows decoded together at most"),
    max_pending: int = typer.Option(DEFAULTS.max_pending, "--max_pending", help="queued + running requests before answering 429"),
    max_body_bytes: int = typer.Option(DEFAULTS.max_body_bytes, "--max_body_bytes"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
):
    """OpenAI-compatible chat server with a web page for chatting and collecting comparisons."""
    import uvicorn

    from alignkit.serve.app import bind_socket, config_dict, create_app, load_state
    from alignkit.serve.config import check_bind

    cfg = ServeConfig(model_name_or_path, served_model_name, host, port, api_key, feedback_db, context_length, history_strategy,
                      summary_max_tokens, summarizer_model, use_chat_template, separator, default_max_tokens, max_tokens_limit,
                      max_n, max_batch_rows, max_pending, max_body_bytes, device)
    try:
        check_bind(host, api_key)  # before the model loads: a refusal should be instant
        sock = bind_socket(host, port)  # a taken port fails here, with its own message
        state = load_state(cfg)
    except OSError as error:
        _fail(ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}"))
    except USER_ERRORS as error:
        _fail(error)
    print({k: v for k, v in config_dict(cfg).items() if v not in ("", 0)})
    print(f"serving {state.model_id} on http://{host}:{port} (web page at /, API at /v1)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(state), log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        state.engine.shutdown()


@feedback_app.command("export")
def feedback_export(
    output: str = typer.Option(..., "--output", help="JSONL: preferences for `alignkit rm` / `alignkit dpo`, demonstrations for `alignkit sft`"),
    feedback_db: str = typer.Option("feedback.db", "--feedback_db", help="the SQLite file `alignkit serve --feedback_db` wrote"),
    annotator: str = typer.Option("", "--annotator", help="only this annotator's judgments"),
    kind: str = typer.Option("preferences", "--kind", help="preferences (the judgments) | demonstrations (the ideal answers people wrote)"),
):
    """Write the stored judgments as preference rows: pairs {prompt, chosen, rejected}, rankings {prompt, responses, ranks};
    with --kind demonstrations, the written answers as SFT rows {prompt, completion}."""
    from alignkit.serve.feedback import export_demonstrations, export_preferences

    try:
        if kind not in ("preferences", "demonstrations"):
            raise ValueError(f"--kind must be preferences or demonstrations, got {kind!r}")
        if kind == "demonstrations":
            written = export_demonstrations(feedback_db, output, annotator or None)
            print(f"wrote {written} demonstration(s) to {output} (prompt/completion rows for `alignkit sft --dataset`)")
            return
        counts = export_preferences(feedback_db, output, annotator or None)
    except USER_ERRORS as error:
        _fail(error)
    written = counts["pairs"] + counts["rankings"]
    print(f"wrote {written} row(s) to {output}: {counts['pairs']} pair(s), {counts['rankings']} ranking(s); "
          f"skipped {counts['skipped_all_tie']} judgment(s) where every response tied")


def register(main_app: typer.Typer) -> None:
    """Add chat, serve and `feedback export` to the `alignkit` command."""
    main_app.command("chat")(chat)
    main_app.command("serve")(serve)
    main_app.add_typer(feedback_app, name="feedback")


if __name__ == "__main__":
    app()

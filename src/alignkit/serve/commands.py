"""The `chat`, `serve` and `feedback export` commands (typer). `register(app)` adds them to `alignkit`."""

from __future__ import annotations

import dataclasses
import logging

import typer

from alignkit.flags import APP_SETTINGS, command_from
from alignkit.serve.config import ChatConfig, FeedbackExportConfig, ServeConfig

log = logging.getLogger("alignkit")
app = typer.Typer(add_completion=False, no_args_is_help=True, **APP_SETTINGS, help="Chat, serve and collect feedback.")
feedback_app = typer.Typer(no_args_is_help=True, **APP_SETTINGS, help="Human feedback collected by `alignkit serve --feedback_db`.")
app.add_typer(feedback_app, name="feedback")


def _load(model_name_or_path: str, device: str):
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.serve.app import _device

    return load_causal_lm(model_name_or_path).to(_device(device)), load_tokenizer(model_name_or_path)


def run_chat_command(cfg: ChatConfig) -> None:
    from alignkit.chat.terminal import ChatSettings, run_chat
    from alignkit.data.tokenize import Formatting
    from alignkit.batching import Engine
    from alignkit.runs import resolve_model

    model, tokenizer = _load(resolve_model(cfg.model_name_or_path), cfg.device)
    context = cfg.context_length or int(getattr(model.config, "max_position_embeddings", 2048))
    if cfg.max_new_tokens >= context:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for the prompt in the context of {context} tokens")
    engine = Engine(model, tokenizer, max_batch_rows=8, prefix_cache_bytes=cfg.prefix_cache_mb * 2**20).start()
    summary_engine = Engine(*_load(cfg.summarizer_model, cfg.device)).start() if cfg.summarizer_model else None
    settings = ChatSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, context, cfg.history_strategy, cfg.summary_max_tokens)
    try:
        run_chat(engine, Formatting(cfg.use_chat_template, cfg.separator), settings, system=cfg.system, summary_engine=summary_engine)
    finally:
        engine.shutdown()
        if summary_engine:
            summary_engine.shutdown()


def run_serve(cfg: ServeConfig) -> None:
    import uvicorn

    from alignkit.runs import resolve_model
    from alignkit.serve.app import bind_socket, config_dict, create_app, load_state

    cfg = dataclasses.replace(cfg, model_name_or_path=resolve_model(cfg.model_name_or_path))  # RUN/ppo: that stage's model
    try:
        sock = bind_socket(cfg.host, cfg.port)  # a taken port fails here, with its own message, before the model loads
    except OSError as error:
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {error.strerror or error}") from None
    state = load_state(cfg)
    log.info(str({k: v for k, v in config_dict(cfg).items() if v not in ("", 0)}))
    log.info(f"serving {state.model_id} on http://{cfg.host}:{cfg.port} (web page at /, API at /v1)")
    try:
        uvicorn.Server(uvicorn.Config(create_app(state), log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        state.engine.shutdown()


def run_feedback_export(cfg: FeedbackExportConfig) -> None:
    from alignkit.serve.feedback import export_demonstrations, export_preferences

    if cfg.kind == "demonstrations":
        written = export_demonstrations(cfg.feedback_db, cfg.output, cfg.annotator or None)
        log.info(f"wrote {written} demonstration(s) to {cfg.output} (prompt/completion rows for `alignkit sft --dataset`)")
        return
    counts = export_preferences(cfg.feedback_db, cfg.output, cfg.annotator or None)
    written = counts["pairs"] + counts["rankings"]
    log.info(f"wrote {written} row(s) to {cfg.output}: {counts['pairs']} pair(s), {counts['rankings']} ranking(s); "
          f"skipped {counts['skipped_all_tie']} judgment(s) where every response tied")


chat = command_from(ChatConfig, run_chat_command)
serve = command_from(ServeConfig, run_serve)
feedback_export = command_from(FeedbackExportConfig, run_feedback_export)
app.command("chat")(chat)
app.command("serve")(serve)
feedback_app.command("export")(feedback_export)


def register(main_app: typer.Typer) -> None:
    """Add chat, serve and `feedback export` to the `alignkit` command."""
    main_app.command("chat")(chat)
    main_app.command("serve")(serve)
    main_app.add_typer(feedback_app, name="feedback")


if __name__ == "__main__":
    app()

"""Redaction of secrets in specs, records and log lines."""

from __future__ import annotations

import pytest

from mmtalker_platform.redaction import REDACTED, redact, redact_text
from mmtalker_platform.spec import TrainJobSpec


def test_redact_masks_secret_keys_and_uri_credentials_and_keeps_the_rest() -> None:
    spec = TrainJobSpec(
        name="r",
        data="/data",
        mlflow={"tracking_uri": "postgresql://mlflow:dbpass@db:5432/mlflow"},
        ray={
            "runtime_env": {
                "env_vars": {
                    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
                    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                    "AWS_SESSION_TOKEN": "sess",
                    "MLFLOW_TRACKING_PASSWORD": 12345,
                    "AWS_REGION": "eu-west-1",
                },
                "pip": ["https://bot:ghp_tok@example.com/pkg.whl"],
            }
        },
    )
    original = spec.model_dump(mode="json")
    redacted = redact(original)

    env = redacted["ray"]["runtime_env"]["env_vars"]
    assert env == {
        "AWS_ACCESS_KEY_ID": REDACTED,
        "AWS_SECRET_ACCESS_KEY": REDACTED,
        "AWS_SESSION_TOKEN": REDACTED,
        "MLFLOW_TRACKING_PASSWORD": REDACTED,
        "AWS_REGION": "eu-west-1",
    }
    assert redacted["mlflow"]["tracking_uri"] == f"postgresql://mlflow:{REDACTED}@db:5432/mlflow"
    assert redacted["ray"]["runtime_env"]["pip"] == [f"https://bot:{REDACTED}@example.com/pkg.whl"]
    assert redacted["data"] == "/data" and redacted["train"] == original["train"]
    # A copy: the spec the job runs with keeps its credentials.
    assert original["ray"]["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert redact(spec) == redacted


@pytest.mark.parametrize(
    ("key", "secret"),
    [("apiKey", True), ("x-api-key", True), ("clientSecret", True), ("private_key", True),
     ("credentials", True), ("cache_data", False), ("max_failures", False), ("speaker", False)],
)  # fmt: skip
def test_secret_names_are_recognised_in_any_case_style(key: str, secret: bool) -> None:
    assert (redact({key: "v"})[key] == REDACTED) is secret


@pytest.mark.parametrize(
    ("line", "expected"),  # "***" stands for the marker
    [
        ("export AWS_SECRET_ACCESS_KEY=abc123 && run", "export AWS_SECRET_ACCESS_KEY=*** && run"),
        ('{"MMTALKER_SERVE_TOKEN": "t0k", "n": 1}', '{"MMTALKER_SERVE_TOKEN": "***", "n": 1}'),
        ("curl -H 'Authorization: Bearer abc.def'", "curl -H 'Authorization: ***'"),
        (
            "GET https://b.s3/k?X-Amz-Signature=ff00&x=1",
            "GET https://b.s3/k?X-Amz-Signature=***&x=1",
        ),
        ("tracking at https://ghp_abc@git.example/x", "tracking at https://***@git.example/x"),
        ("epoch 3: lve 1.2e-05, data /data/demo", "epoch 3: lve 1.2e-05, data /data/demo"),
    ],
)
def test_redact_text_masks_credentials_in_log_lines_and_is_idempotent(
    line: str, expected: str
) -> None:
    expected = expected.replace("***", REDACTED)
    assert redact_text(line) == expected
    assert redact_text(expected) == expected

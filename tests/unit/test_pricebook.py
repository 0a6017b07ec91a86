"""The packaged price book and GPU model catalogue, and the errors a bad price file gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpuledger.schema.messages import PriceEntry, PricingModel
from gpuledger.schema.pricebook import (
    PriceBookError,
    load_gpu_models,
    load_price_book,
    parse_endpoint_values,
    parse_gpu_models,
)

HEADER = "provider,region,gpu_model,pricing_model,usd_per_gpu_hour,effective_from,source,read_on\n"


@pytest.mark.parametrize(
    ("product_name", "gpu_model"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla V100-PCIE-32GB", "V100"),
        ("Tesla V100S-PCIE-32GB", "V100"),
        ("NVIDIA A30", "A30"),
        ("nvidia h100 80gb hbm3", "H100"),
    ],
)
def test_nvml_product_names_map_to_canonical_models(product_name: str, gpu_model: str) -> None:
    assert load_gpu_models().model_for(product_name) == gpu_model


@pytest.mark.parametrize(
    "product_name",
    ["NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA L40", "NVIDIA GeForce RTX 4090", ""],
)
def test_look_alike_products_are_not_mistaken_for_a_priced_model(product_name: str) -> None:
    assert load_gpu_models().model_for(product_name) is None


def test_mig_capable_models_know_their_slice_count() -> None:
    catalog = load_gpu_models()
    for model in ("A100-40GB", "A100-80GB", "H100", "H200", "B200"):
        assert catalog.mig_slices(model) == 7
    assert catalog.mig_slices("A30") == 4
    assert catalog.mig_slices("T4") is None
    assert catalog.mig_slices("not-a-model") is None


def test_packaged_price_book_covers_every_catalogued_model_on_demand_anywhere() -> None:
    book = load_price_book()
    fallbacks = {
        e.gpu_model
        for e in book
        if e.provider == "*" and e.region == "*" and e.pricing_model is PricingModel.on_demand
    }
    assert fallbacks == set(load_gpu_models().models)
    assert all(e.usd_per_gpu_hour > 0 for e in book)


def test_packaged_price_book_has_the_three_clouds_and_a_gpu_cloud_for_every_tier() -> None:
    book = load_price_book()
    places = {(e.provider, e.region) for e in book}
    assert {("aws", "us-east-1"), ("gcp", "us-central1"), ("azure", "eastus")} <= places
    assert {e.pricing_model for e in book} == set(PricingModel)
    h100_aws = sorted(
        (e for e in book if (e.provider, e.gpu_model) == ("aws", "H100")),
        key=lambda e: e.effective_from,
    )
    # The June 2025 P5 price cut is a dated entry, not an overwrite of history.
    assert [e.effective_from for e in h100_aws] == [0.0, 1748736000.0]
    assert h100_aws[1].usd_per_gpu_hour < h100_aws[0].usd_per_gpu_hour


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_user_price_file_with_comments_and_iso_dates_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ours.csv",
        "# negotiated rates\n"
        "provider,region,gpu_model,pricing_model,usd_per_gpu_hour,effective_from\n"
        "\n"
        "aws,us-east-1,H100,reserved,4.10,2025-07-01\n"
        "onprem,*,A100-80GB,on_demand,1.20,\n",
    )
    assert load_price_book(path) == [
        PriceEntry(
            provider="aws",
            region="us-east-1",
            gpu_model="H100",
            pricing_model=PricingModel.reserved,
            usd_per_gpu_hour=4.10,
            effective_from=1751328000.0,
        ),
        PriceEntry(
            provider="onprem",
            region="*",
            gpu_model="A100-80GB",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=1.20,
            effective_from=0.0,
        ),
    ]


def test_a_json_lines_price_file_loads(tmp_path: Path) -> None:
    entries = [
        PriceEntry(
            provider="lambda",
            region="*",
            gpu_model="B200",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=4.99,
        ),
        PriceEntry(
            provider="*",
            region="*",
            gpu_model="T4",
            pricing_model=PricingModel.spot,
            usd_per_gpu_hour=0.2,
            effective_from=1.7e9,
        ),
    ]
    path = write(tmp_path, "prices.jsonl", "".join(e.model_dump_json() + "\n" for e in entries))
    assert load_price_book(path) == entries


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "aws,us-east-1,H100,on_demand,-3.0,0,,",
            "bad.csv line 3: usd_per_gpu_hour must be >= 0, got -3.0",
        ),
        (
            "aws,us-east-1,H100,on_demand,cheap,0,,",
            "bad.csv line 3: usd_per_gpu_hour must be a finite number of USD, e.g. 2.99, "
            "got 'cheap'",
        ),
        (
            "aws,us-east-1,H1000,on_demand,3.0,0,,",
            "bad.csv line 3: gpu_model is not in the GPU model catalogue; use one of",
        ),
        (
            "aws,us-east-1,H100,ondemand,3.0,0,,",
            "bad.csv line 3: pricing_model must be one of on_demand, spot, reserved, "
            "got 'ondemand'",
        ),
        (
            "*,us-east-1,H100,on_demand,3.0,0,,",
            "bad.csv line 3: region must be * when provider is *",
        ),
        (
            ",us-east-1,H100,on_demand,3.0,0,,",
            "bad.csv line 3: provider must not be empty (use * for any), got ''",
        ),
        (
            "aws,us-east-1,H100,on_demand,3.0,next tuesday,,",
            "bad.csv line 3: effective_from must be epoch seconds or an ISO date",
        ),
        (
            "aws,us-east-1,H100,on_demand,3.0",
            "bad.csv line 3: has 5 fields where the header has 8",
        ),
    ],
)
def test_a_bad_price_line_names_file_line_field_and_value(
    tmp_path: Path, row: str, message: str
) -> None:
    path = write(tmp_path, "bad.csv", "# header next\n" + HEADER + row + "\n")
    with pytest.raises(PriceBookError) as caught:
        load_price_book(path)
    assert str(caught.value).startswith(message)
    assert caught.value.line == 3


def test_a_repeated_price_key_points_at_the_first_line(tmp_path: Path) -> None:
    row = "aws,us-east-1,H100,on_demand,3.0,0,,\n"
    path = write(tmp_path, "twice.csv", HEADER + row + row)
    with pytest.raises(
        PriceBookError, match=r"twice\.csv line 3: .*repeats the price key of line 2"
    ):
        load_price_book(path)


def test_a_misspelt_column_is_refused_rather_than_silently_defaulted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "typo.csv",
        "provider,region,gpu_model,pricing_model,usd_per_gpu_hour,effective_form\n",
    )
    with pytest.raises(PriceBookError, match=r"typo\.csv line 1: column is unknown; expected"):
        load_price_book(path)


def test_a_bad_json_price_line_names_the_field(tmp_path: Path) -> None:
    good = {"provider": "aws", "region": "*", "gpu_model": "T4", "pricing_model": "spot"}
    lines = [
        json.dumps({**good, "usd_per_gpu_hour": 0.2}),
        json.dumps({**good, "usd_per_gpu_hour": -1, "effective_from": 5}),
    ]
    path = write(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(PriceBookError) as caught:
        load_price_book(path)
    assert caught.value.line == 2
    assert caught.value.field == "usd_per_gpu_hour"
    assert caught.value.value == -1
    assert str(caught.value).startswith("p.jsonl line 2: usd_per_gpu_hour is refused")


def test_a_missing_price_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(PriceBookError, match="cannot be read"):
        load_price_book(tmp_path / "nowhere.csv")


def test_a_bad_gpu_model_catalogue_line_is_refused_with_its_line() -> None:
    text = "pattern,gpu_model,mig_slices\n\\bH100\\b,H100,7\n(unclosed,X1,\n"
    with pytest.raises(
        PriceBookError, match=r"gpu_models\.csv line 3: pattern is not a valid regex"
    ):
        parse_gpu_models(text)
    text = "pattern,gpu_model,mig_slices\nH100,H100,7\nH100 PCIe,H100,4\n"
    with pytest.raises(PriceBookError, match="line 3: mig_slices differs from line 2"):
        parse_gpu_models(text)
    text = "pattern,gpu_model,mig_slices\nA30,A30,four\n"
    with pytest.raises(PriceBookError, match="line 2: mig_slices must be a whole number"):
        parse_gpu_models(text)


def test_a_price_book_checks_models_against_a_custom_catalogue(tmp_path: Path) -> None:
    catalog_path = write(tmp_path, "models.csv", "pattern,gpu_model,mig_slices\nMI300X,MI300X,\n")
    catalog = load_gpu_models(catalog_path)
    assert catalog.model_for("AMD Instinct MI300X") == "MI300X"
    book = write(tmp_path, "amd.csv", HEADER + "azure,eastus,MI300X,on_demand,6.0,0,,\n")
    assert load_price_book(book, catalog=catalog)[0].gpu_model == "MI300X"
    with pytest.raises(PriceBookError, match="gpu_model is not in the GPU model catalogue"):
        load_price_book(book)


# --- endpoint values ----------------------------------------------------------------------

VALUES_HEADER = "endpoint,usd_per_1k_requests,effective_from,note\n"


def test_endpoint_values_read_with_their_dates() -> None:
    values = parse_endpoint_values(
        VALUES_HEADER
        + "# revenue per 1,000 requests\nchat-api,0.40,,list\nchat-api,0.55,2026-03-01,\n"
    )
    assert [(v.endpoint, v.usd_per_1k_requests, v.effective_from) for v in values] == [
        ("chat-api", 0.40, 0.0),
        ("chat-api", 0.55, 1772323200.0),
    ]


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("*,0.4,,", "line 2: endpoint must be the inference job's id"),
        ("chat,abc,,", "line 2: usd_per_1k_requests must be a finite number of USD >= 0"),
        ("chat,-0.1,,", "line 2: usd_per_1k_requests must be a finite number"),
        ("chat,nan,,", "line 2: usd_per_1k_requests must be a finite number"),
        ("chat,0.4,yesterday,", "line 2: effective_from must be epoch seconds or an ISO date"),
        ("chat,0.4", "line 2: has 2 fields where the header has 4"),
    ],
)
def test_a_bad_endpoint_value_names_its_line_field_and_value(line: str, said: str) -> None:
    with pytest.raises(PriceBookError) as refused:
        parse_endpoint_values(VALUES_HEADER + line + "\n", "values.csv")
    assert str(refused.value).startswith("values.csv " + said)


def test_an_endpoint_and_time_given_twice_is_refused() -> None:
    with pytest.raises(PriceBookError, match=r"line 3: effective_from .*repeats line 2"):
        parse_endpoint_values(VALUES_HEADER + "chat,0.4,,\nchat,0.5,,\n", "values.csv")
    with pytest.raises(PriceBookError, match="has no endpoint values"):
        parse_endpoint_values(VALUES_HEADER, "values.csv")

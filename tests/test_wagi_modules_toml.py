"""modules.toml as WAGI 0.8 reads it: every key it knows, its own example file unchanged, a
likely typo refused with the key meant, other unknown keys warned about once, Bindle refused.
A real server on 127.0.0.1 serves the files; the parser is the one the server runs."""

from __future__ import annotations

import logging
import shutil

import pytest
import trio

from supervisor.errors import ConfigError
from supervisor.tenants import parse_modules_toml
from tests.conftest import GUESTS
from tests.test_reload import says, until, until_error

# WAGI 0.8.1's examples/modules.toml, key for key, with our WAT guests in place of its wasm files.
WAGI_EXAMPLE = """\
default_host = "localhost:3000"

[[module]]
route = "/"
module = "entry.wat"

[[module]]
route = "/hello/..."
module = "entry.wat"

[[module]]
route = "/bar"
module = "entry.wat"
entrypoint = "alt"

[[module]]
route = "/args"
module = "argv.wat"
argv = "${SCRIPT_NAME} one two"

[[module]]
route = "/fs/..."
module = "entry.wat"
volumes = {"/" = "files"}

[[module]]
route = "/http-example"
module = "entry.wat"
allowed_hosts = ["https://api.brigade.sh"]
http_max_concurrency = 2
"""

ENTRY = {"route": "/x", "module": "m.wat"}


def write_tenant(workspace, text: str):
    folder = workspace.tenants / "demo"
    folder.mkdir()
    (folder / "files").mkdir()
    workspace.write_policy("demo", "")
    for guest in ("entry.wat", "argv.wat"):
        shutil.copyfile(GUESTS / guest, folder / guest)
    (folder / "modules.toml").write_text(text)
    return folder


async def test_wagis_example_modules_toml_is_served_unchanged(workspace, start_supervisor):
    write_tenant(workspace, WAGI_EXAMPLE)
    running = await start_supervisor()
    assert dict(running.app.registry.state.errors) == {}
    for path, body in [
        ("/demo/", "from _start\n"),
        ("/demo/hello/there", "from _start\n"),
        ("/demo/bar", "from alt\n"),
        ("/demo/fs/a", "from _start\n"),
        ("/demo/http-example", "from _start\n"),
        ("/demo/args", "/demo/args\none\ntwo\n"),
    ]:
        response = await running.client.get(path)
        assert (path, response.status_code, response.text) == (path, 200, body)


@pytest.mark.parametrize(
    ("data", "key", "meant"),
    [
        ({"module": [{**ENTRY, "entrypiont": "alt"}]}, "module[0].entrypiont", "entrypoint"),
        ({"module": [{**ENTRY, "volume": {}}]}, "module[0].volume", "volumes"),
        ({"module": [{**ENTRY, "allowed_host": []}]}, "module[0].allowed_host", "allowed_hosts"),
        ({"modules": [ENTRY]}, "modules", "module"),
    ],
)
def test_a_typo_of_a_known_key_is_an_error_naming_the_key_meant(data, key, meant):
    with pytest.raises(ConfigError) as info:
        parse_modules_toml(data, source="t/modules.toml")
    assert str(info.value) == f"t/modules.toml: {key}: unknown key (did you mean `{meant}`?)"


async def test_a_typo_in_a_served_file_keeps_the_old_routes(workspace, start_supervisor):
    folder = write_tenant(workspace, WAGI_EXAMPLE)
    running = await start_supervisor()
    (folder / "modules.toml").write_text(
        WAGI_EXAMPLE.replace('entrypoint = "alt"', 'entrypiont = "alt"')
    )
    message = await until_error(running, "demo")
    assert "module[2].entrypiont: unknown key (did you mean `entrypoint`?)" in message
    assert (await running.client.get("/demo/bar")).text == "from alt\n"


async def test_other_unknown_keys_are_warned_about_once_and_ignored(
    workspace, start_supervisor, caplog
):
    caplog.set_level(logging.WARNING, logger="supervisor.tenants")
    text = 'repository = "RESERVED"\n' + WAGI_EXAMPLE + 'description = "a WAGI app"\n'
    folder = write_tenant(workspace, text)
    running = await start_supervisor()
    assert (await running.client.get("/demo/bar")).text == "from alt\n"
    # Two reloads of the same file: still one warning per key.
    for route in ("/baz", "/qux"):
        (folder / "modules.toml").write_text(text.replace('route = "/bar"', f'route = "{route}"'))
        await until(running, f"/demo{route}", says(200, "from alt"))
    source = str(folder / "modules.toml")
    warnings = [r.getMessage() for r in caplog.records if r.name == "supervisor.tenants"]
    expected = {
        f"{source}: repository: unknown key ignored (known: module)",
        f"{source}: default_host: WAGI never reads it; ignored",
        f"{source}: module[5].description: unknown key ignored (known: allowed_hosts, argv,"
        " bindle_server, entrypoint, http_max_concurrency, module, route, volumes)",
    }
    assert sorted(w for w in warnings if source in w) == sorted(expected)


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"route": "/x", "module": "bindle:example.com/hello/1.0.0"}, "module[0].module"),
        ({**ENTRY, "bindle_server": "http://localhost:8080/v1"}, "module[0].bindle_server"),
    ],
)
def test_bindle_modules_are_refused_clearly(entry, key):
    with pytest.raises(ConfigError) as info:
        parse_modules_toml({"module": [entry]}, source="t/modules.toml")
    assert str(info.value).startswith(f"t/modules.toml: {key}: Bindle is gone")
    assert "file path or an oci: reference" in str(info.value)


async def test_a_bindle_module_in_a_served_file_is_reported(workspace, start_supervisor):
    write_tenant(workspace, '[[module]]\nroute = "/"\nmodule = "bindle:example.com/a/1"\n')
    running = await start_supervisor()
    message = await until_error(running, "demo")
    assert "module[0].module: Bindle is gone" in message


# Paths outside the tenant's folder: `wagi` mode's alone (the operator's own file).


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///srv/app/x.wasm", "/srv/app/x.wasm"),
        ("file://localhost/srv/my%20app/x.wat?v=1#top", "/srv/my app/x.wat"),
        ("FILE:/srv/x.wasm", "/srv/x.wasm"),
        ("file:x.wasm", "/x.wasm"),  # as `Url::parse` reads it: file:///x.wasm
    ],
)
def test_wagi_mode_reads_a_file_url_as_wagi_does(url, path):
    (spec,) = parse_modules_toml(
        {"module": [{"route": "/x", "module": url}]}, source="m", operator_paths=True
    )
    assert spec.module == path


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://server/share/x.wasm", "names the host 'server': only a local file"),
        ("file:///", "names no file"),
    ],
)
def test_wagi_mode_refuses_a_file_url_it_cannot_read(url, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_modules_toml(
            {"module": [{"route": "/x", "module": url}]}, source="m", operator_paths=True
        )
    assert str(info.value).startswith("m: module[0].module: the file: URL")


def test_wagi_mode_takes_any_volume_folder_and_checks_the_guest_path():
    entry = {**ENTRY, "volumes": {"/data/": "/srv/data", "/up": "../shared"}}
    (spec,) = parse_modules_toml({"module": [entry]}, source="m", operator_paths=True)
    assert dict(spec.volumes) == {"/data": "/srv/data", "/up": "../shared"}
    with pytest.raises(ConfigError, match="the guest path must be absolute"):
        parse_modules_toml(
            {"module": [{**ENTRY, "volumes": {"data": "/srv"}}]}, source="m", operator_paths=True
        )


async def test_a_tenants_file_url_and_absolute_volume_stay_refused(
    workspace, start_supervisor, tmp_path
):
    """In `serve` mode a tenant's files stay inside its folder: the server says why."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(GUESTS / "entry.wat", outside / "entry.wat")
    url = (outside / "entry.wat").as_uri()
    folder = write_tenant(workspace, f'[[module]]\nroute = "/x"\nmodule = "{url}"\n')
    running = await start_supervisor()
    message = await until_error(running, "demo")
    assert "module[0].module: a file: URL is read only by `wasm-supervisor wagi`" in message
    entry = f'[[module]]\nroute = "/x"\nmodule = "entry.wat"\nvolumes = {{"/d" = "{outside}"}}\n'
    (folder / "modules.toml").write_text(entry)
    with trio.fail_after(30):
        while "not absolute" not in running.app.registry.state.errors.get("demo", ""):
            await trio.sleep(0.02)
    assert (
        'volumes."/d": the folder must be relative to the tenant\'s folder'
        in (running.app.registry.state.errors["demo"])
    )
    assert (await running.client.get("/demo/x")).status_code == 404

"""The demo tenant answers through a real server."""

from conftest import DEMO


async def test_demo_hello_through_the_server(workspace, start_supervisor):
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running = await start_supervisor()
    response = await running.client.get("/demo/hello")
    assert response.status_code == 200
    assert response.text == "hello from wasm\n"
    assert DEMO.exists()

from vfu_inspect import registry


def pytest_configure(config):
    registry.load()      # what the CLI's main does first: every test sees the registries
    config.addinivalue_line("markers", "server_args(*args): extra sample-server options")

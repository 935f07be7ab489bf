def pytest_configure(config):
    config.addinivalue_line("markers", "server_args(*args): extra sample-server options")

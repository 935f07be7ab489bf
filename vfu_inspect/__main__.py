from .cli import main

if __name__ == "__main__":      # `python -m vfu_inspect`; importing it runs nothing
    raise SystemExit(main())

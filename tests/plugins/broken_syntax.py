# A plugin with a syntax error: loading it must fail with a one-line error naming this file.
def run(graph:
    pass

raise RuntimeError("this task file is broken")

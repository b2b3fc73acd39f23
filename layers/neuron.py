"""(placeholder; filled in by its family's module)"""

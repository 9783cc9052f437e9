"""normfree.checkpoints"""

"""normfree.train"""

"""normfree.analysis"""

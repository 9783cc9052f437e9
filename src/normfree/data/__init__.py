"""normfree.data"""

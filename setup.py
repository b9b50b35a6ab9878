"""Vaurien: one module, no runtime dependencies."""

from setuptools import setup

with open('README.txt', encoding='utf-8') as readme:
    long_description = readme.read()

setup(
    name='vaurien',
    version='3.0.0',
    description='A chaos TCP proxy: delays, breaks, hangs, cuts or corrupts the traffic '
                'to a backend, on demand, for tests.',
    long_description=long_description,
    long_description_content_type='text/plain',
    license='Apache-2.0',
    py_modules=['vaurien'],
    python_requires='>=3.8',
    entry_points={'console_scripts': ['vaurien=vaurien:main']},
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Topic :: Software Development :: Testing',
        'Topic :: System :: Networking',
    ],
)
